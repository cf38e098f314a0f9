//! The `options` leaf of a held SYN: an OCaml `Options.t list` in sexplib's machine form, as
//! the original Synjitsu wrote it and the patched MirageOS TCP stack reads it, for example
//! `((Window_size_shift 10)Noop(Timestamp 736287380 0)SACK_ok(MSS 1460))` for a Linux SYN
//! (the list in the stack's own order, reverse wire order: [`super::layout::options_from_wire`]).
//!
//! Owns the S-expression text both ways: sexplib's quoting and OCaml's escapes on the way out,
//! any whitespace and a bounded nesting depth on the way in, and the mapping of each form onto
//! a [`TcpOption`]. The options themselves and the other leaves are [`super::layout`]'s.

use std::fmt::Write as _;

use super::layout::{TcpOption, parse_int32};

/// A parsed S-expression.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Sexp {
    Atom(Vec<u8>),
    List(Vec<Sexp>),
}

/// Why the `options` text is not a list of options.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SexpError {
    /// Not an S-expression at all.
    #[error("bad S-expression at byte {offset}: {what}")]
    Syntax {
        /// Where.
        offset: usize,
        /// What was expected.
        what: &'static str,
    },
    /// An S-expression, but not of `Options.t list`.
    #[error("not a TCP option: {0}")]
    NotAnOption(String),
}

fn atom(s: impl Into<Vec<u8>>) -> Sexp {
    Sexp::Atom(s.into())
}

fn int32_atom(v: u32) -> Sexp {
    atom((v as i32).to_string())
}

fn option_to_sexp(opt: &TcpOption) -> Sexp {
    match opt {
        TcpOption::Noop => atom("Noop"),
        TcpOption::Mss(m) => Sexp::List(vec![atom("MSS"), atom(m.to_string())]),
        TcpOption::WindowSizeShift(s) => {
            Sexp::List(vec![atom("Window_size_shift"), atom(s.to_string())])
        }
        TcpOption::SackOk => atom("SACK_ok"),
        TcpOption::Sack(blocks) => Sexp::List(vec![
            atom("SACK"),
            Sexp::List(
                blocks
                    .iter()
                    .map(|(l, r)| Sexp::List(vec![int32_atom(*l), int32_atom(*r)]))
                    .collect(),
            ),
        ]),
        TcpOption::Timestamp(a, b) => {
            Sexp::List(vec![atom("Timestamp"), int32_atom(*a), int32_atom(*b)])
        }
        TcpOption::Unknown(kind, data) => Sexp::List(vec![
            atom("Unknown"),
            atom(kind.to_string()),
            atom(data.clone()),
        ]),
    }
}

/// Sexplib's `must_escape`: which atoms are written quoted.
fn must_escape(s: &[u8]) -> bool {
    if s.is_empty() {
        return true;
    }
    s.iter().enumerate().any(|(i, &c)| match c {
        b'"' | b'(' | b')' | b';' | b'\\' => true,
        b'|' => i > 0 && s[i - 1] == b'#',
        b'#' => i > 0 && s[i - 1] == b'|',
        0..=32 | 127..=255 => true,
        _ => false,
    })
}

/// OCaml's `String.escaped`, inside double quotes.
fn write_escaped(out: &mut String, s: &[u8]) {
    out.push('"');
    for &c in s {
        match c {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\r' => out.push_str("\\r"),
            8 => out.push_str("\\b"),
            32..=126 => out.push(c as char),
            _ => {
                let _ = write!(out, "\\{c:03}");
            }
        }
    }
    out.push('"');
}

/// Sexplib's `to_string_mach`; returns whether the last thing written was a bare atom.
fn write_mach(out: &mut String, sexp: &Sexp, may_need_space: bool) -> bool {
    match sexp {
        Sexp::Atom(a) => {
            if must_escape(a) {
                write_escaped(out, a);
                false
            } else {
                if may_need_space {
                    out.push(' ');
                }
                out.push_str(std::str::from_utf8(a).expect("unescaped atoms are ASCII"));
                true
            }
        }
        Sexp::List(items) => {
            out.push('(');
            let mut space = false;
            for item in items {
                space = write_mach(out, item, space);
            }
            out.push(')');
            false
        }
    }
}

/// The `options` leaf: sexplib's machine form of an `Options.t list`, in the list's order,
/// e.g. `((Window_size_shift 10)Noop(Timestamp 736287380 0)SACK_ok(MSS 1460))`.
pub fn options_to_sexp(options: &[TcpOption]) -> String {
    let mut out = String::new();
    write_mach(
        &mut out,
        &Sexp::List(options.iter().map(option_to_sexp).collect()),
        false,
    );
    out
}

struct Reader<'a> {
    s: &'a [u8],
    i: usize,
}

impl Reader<'_> {
    fn err(&self, what: &'static str) -> SexpError {
        SexpError::Syntax {
            offset: self.i,
            what,
        }
    }

    fn skip_ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn sexp(&mut self, depth: usize) -> Result<Sexp, SexpError> {
        // Options nest three deep at most; bound recursion on hostile input.
        if depth > 16 {
            return Err(self.err("nesting deeper than any option"));
        }
        self.skip_ws();
        match self.s.get(self.i) {
            None => Err(self.err("an atom or a list")),
            Some(b'(') => {
                self.i += 1;
                let mut items = Vec::new();
                loop {
                    self.skip_ws();
                    match self.s.get(self.i) {
                        None => return Err(self.err("`)`")),
                        Some(b')') => {
                            self.i += 1;
                            return Ok(Sexp::List(items));
                        }
                        Some(_) => items.push(self.sexp(depth + 1)?),
                    }
                }
            }
            Some(b')') => Err(self.err("an atom or a list, not `)`")),
            Some(b'"') => self.quoted(),
            Some(_) => {
                let start = self.i;
                while let Some(&c) = self.s.get(self.i) {
                    if c.is_ascii_whitespace() || matches!(c, b'(' | b')' | b'"') {
                        break;
                    }
                    self.i += 1;
                }
                Ok(Sexp::Atom(self.s[start..self.i].to_vec()))
            }
        }
    }

    fn quoted(&mut self) -> Result<Sexp, SexpError> {
        self.i += 1;
        let mut out = Vec::new();
        loop {
            let c = *self.s.get(self.i).ok_or_else(|| self.err("closing `\"`"))?;
            self.i += 1;
            match c {
                b'"' => return Ok(Sexp::Atom(out)),
                b'\\' => {
                    let e = *self.s.get(self.i).ok_or_else(|| self.err("an escape"))?;
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b' ' => out.push(b' '),
                        b'\\' | b'"' | b'\'' => out.push(e),
                        b'\n' => self.skip_ws(),
                        b'0'..=b'9' => {
                            let d = self.s.get(self.i - 1..self.i + 2);
                            let v = d
                                .filter(|d| d.iter().all(u8::is_ascii_digit))
                                .map(|d| d.iter().fold(0u32, |a, x| a * 10 + u32::from(x - b'0')))
                                .filter(|v| *v <= 255)
                                .ok_or_else(|| self.err("three decimal digits below 256"))?;
                            out.push(v as u8);
                            self.i += 2;
                        }
                        b'x' => {
                            let d = self.s.get(self.i..self.i + 2);
                            let v = d
                                .and_then(|d| std::str::from_utf8(d).ok())
                                .and_then(|d| u8::from_str_radix(d, 16).ok())
                                .ok_or_else(|| self.err("two hex digits"))?;
                            out.push(v);
                            self.i += 2;
                        }
                        _ => {
                            // OCaml keeps an unknown escape as both characters.
                            out.push(b'\\');
                            out.push(e);
                        }
                    }
                }
                _ => out.push(c),
            }
        }
    }
}

fn atom_str(s: &Sexp) -> Option<&str> {
    match s {
        Sexp::Atom(a) => std::str::from_utf8(a).ok(),
        Sexp::List(_) => None,
    }
}

fn atom_int32(s: &Sexp) -> Option<u32> {
    atom_str(s).and_then(parse_int32)
}

fn option_from_sexp(s: &Sexp) -> Result<TcpOption, SexpError> {
    let bad = || SexpError::NotAnOption(format!("{s:?}"));
    match s {
        Sexp::Atom(a) if a.as_slice() == b"SACK_ok" => Ok(TcpOption::SackOk),
        Sexp::Atom(a) if a.as_slice() == b"Noop" => Ok(TcpOption::Noop),
        Sexp::Atom(_) => Err(bad()),
        Sexp::List(items) => {
            let tag = items.first().and_then(atom_str).ok_or_else(bad)?;
            let args = &items[1..];
            let opt = match (tag, args) {
                ("MSS", [m]) => atom_str(m).and_then(|m| m.parse().ok()).map(TcpOption::Mss),
                ("Window_size_shift", [w]) => atom_str(w)
                    .and_then(|w| w.parse().ok())
                    .map(TcpOption::WindowSizeShift),
                ("SACK", [Sexp::List(blocks)]) => blocks
                    .iter()
                    .map(|b| match b {
                        Sexp::List(lr) if lr.len() == 2 => {
                            Some((atom_int32(&lr[0])?, atom_int32(&lr[1])?))
                        }
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
                    .map(TcpOption::Sack),
                ("Timestamp", [a, b]) => atom_int32(a)
                    .zip(atom_int32(b))
                    .map(|(a, b)| TcpOption::Timestamp(a, b)),
                ("Unknown", [k, Sexp::Atom(data)]) => atom_str(k)
                    .and_then(|k| k.parse().ok())
                    .map(|k| TcpOption::Unknown(k, data.clone())),
                _ => None,
            };
            opt.ok_or_else(bad)
        }
    }
}

/// Reads the `options` leaf back, keeping the list's order (the original's or any other: a
/// guest looks options up, it does not walk them); accepts any whitespace between elements.
pub fn options_from_sexp(text: &str) -> Result<Vec<TcpOption>, SexpError> {
    let mut r = Reader {
        s: text.as_bytes(),
        i: 0,
    };
    let sexp = r.sexp(0)?;
    r.skip_ws();
    if r.i != r.s.len() {
        return Err(r.err("end of input"));
    }
    match sexp {
        Sexp::List(items) => items.iter().map(option_from_sexp).collect(),
        Sexp::Atom(_) => Err(SexpError::NotAnOption("a bare atom, not a list".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::layout::tests::LINUX_SYN_OPTIONS;
    use crate::store::layout::{options_from_wire, options_to_wire};

    /// The reference (`xenstore-syn-layout.md`, from the original stack's `tcp/options.ml`):
    /// a Linux SYN's options, `mss 1460, sackOK, TS val 736287380 ecr 0, nop, wscale 10` on
    /// the wire, are written as this string: one `Noop` per NOP byte, the list in reverse
    /// wire order, one space only where two atoms meet.
    const ORIGINAL_LINUX_SYN: &str =
        "((Window_size_shift 10)Noop(Timestamp 736287380 0)SACK_ok(MSS 1460))";

    #[test]
    fn a_linux_syn_is_written_as_the_original_stack_writes_it() {
        let opts = options_from_wire(&LINUX_SYN_OPTIONS).unwrap();
        assert_eq!(options_to_sexp(&opts), ORIGINAL_LINUX_SYN);
        assert_eq!(options_from_sexp(ORIGINAL_LINUX_SYN).unwrap(), opts);
    }

    #[test]
    fn the_reader_takes_either_order_and_noop() {
        let wire_order = "((MSS 1460)SACK_ok(Timestamp 736287380 0)(Window_size_shift 10))";
        let read = options_from_sexp(wire_order).unwrap();
        let original = options_from_sexp(ORIGINAL_LINUX_SYN).unwrap();
        assert_eq!(read.len(), 4);
        assert_eq!(original.len(), 5, "{original:?}");
        for o in &read {
            assert!(original.contains(o), "{o:?} not in {original:?}");
        }
    }

    #[test]
    fn int32_atoms_are_signed_and_readers_take_any_whitespace() {
        let opts = vec![
            TcpOption::Timestamp(0xffff_ffff, 0x8000_0000),
            TcpOption::Sack(vec![(1, 2), (0xfffffffe, 3)]),
        ];
        let s = options_to_sexp(&opts);
        assert_eq!(s, "((Timestamp -1 -2147483648)(SACK((1 2)(-2 3))))");
        assert_eq!(options_from_sexp(&s).unwrap(), opts);
        let spaced = " ( (Timestamp\t-1\n -2147483648 ) ( SACK ( (1 2) (-2 3) ) ) ) ";
        assert_eq!(options_from_sexp(spaced).unwrap(), opts);
        assert_eq!(options_to_sexp(&[]), "()");
        assert_eq!(options_from_sexp("()").unwrap(), vec![]);
    }

    #[test]
    fn unknown_options_round_trip_through_quoted_atoms() {
        let opts = vec![
            TcpOption::Unknown(30, vec![1, 2, b'"', b'\\', b' ', b'a']),
            TcpOption::Unknown(34, vec![]),
            TcpOption::Unknown(253, b"plain".to_vec()),
        ];
        let s = options_to_sexp(&opts);
        assert_eq!(
            s,
            "((Unknown 30\"\\001\\002\\\"\\\\ a\")(Unknown 34\"\")(Unknown 253 plain))"
        );
        assert_eq!(options_from_sexp(&s).unwrap(), opts);
        let wire = options_to_wire(&opts);
        assert_eq!(options_from_wire(&wire).unwrap(), opts);
    }

    #[test]
    fn malformed_sexps_are_errors() {
        for bad in [
            "",
            "(",
            ")",
            "((MSS 1460)",
            "((MSS 1460)))",
            "MSS",
            "((MSS))",
            "((MSS 70000))",
            "((MSS x))",
            "((Frobnicate 1))",
            "((Timestamp 1))",
            "((Timestamp 1 2 3))",
            "((Timestamp 99999999999 0))",
            "((SACK (1 2)))",
            "((Unknown 300 \"\"))",
            "((Unknown 3 \"\\999\"))",
            "((Unknown 3 \"unterminated))",
            "(((((((((((((((((((((((((((((((((((((())))))))))))))))))))))))))))))))))))))",
        ] {
            assert!(options_from_sexp(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
