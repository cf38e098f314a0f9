// SPDX-License-Identifier: GPL-3.0-only
//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`: the compiler emits calls to them, and
//! on the host target they come from libc, which a kernel does not have (the prebuilt
//! `compiler_builtins` leaves them out there). In assembly, because a Rust loop here would be
//! turned back into a call to the function it implements. Bulk moves go a quadword at a time:
//! under TCG every `rep` iteration costs about the same whatever its width.

use core::arch::global_asm;

global_asm!(
    r#"
    .pushsection .text.mem, "ax"
    .global memcpy
    .balign 16
memcpy:
    mov %rdi, %rax
    mov %rdx, %rcx
    shr $3, %rcx
    rep movsq
    mov %rdx, %rcx
    and $7, %rcx
    rep movsb
    ret

    .global memmove
    .balign 16
memmove:
    cmp %rsi, %rdi
    jbe memcpy
    lea (%rsi, %rdx), %r8
    cmp %r8, %rdi
    jae memcpy
    /* The destination overlaps the end of the source: copy backwards. */
    mov %rdi, %rax
    lea -1(%rsi, %rdx), %rsi
    lea -1(%rdi, %rdx), %rdi
    mov %rdx, %rcx
    std
    rep movsb
    cld
    ret

    .global memset
    .balign 16
memset:
    mov %rdi, %r9
    movzbl %sil, %eax
    movabs $0x0101010101010101, %r8
    imul %r8, %rax
    mov %rdx, %rcx
    shr $3, %rcx
    rep stosq
    mov %rdx, %rcx
    and $7, %rcx
    rep stosb
    mov %r9, %rax
    ret

    .global memcmp
    .global bcmp
    .balign 16
memcmp:
bcmp:
    xor %eax, %eax
    test %rdx, %rdx
    jz 2f
1:  movzbl (%rdi), %eax
    movzbl (%rsi), %ecx
    sub %ecx, %eax
    jnz 2f
    inc %rdi
    inc %rsi
    dec %rdx
    jnz 1b
2:  ret
    .popsection
    "#,
    options(att_syntax)
);
