//! The system interfaces safe Rust cannot reach: the only module allowed `unsafe`, each block
//! with a `// SAFETY:` comment.

#[allow(unsafe_code)]
pub mod packet;

/// A libc return value: negative is the thread's `errno`.
fn check(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}
