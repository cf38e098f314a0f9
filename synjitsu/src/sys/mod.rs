//! The system interfaces safe Rust cannot reach: the only module allowed `unsafe`, each block
//! with a `// SAFETY:` comment.

#[allow(unsafe_code)]
pub mod packet;

#[allow(unsafe_code)]
pub mod netlink;
