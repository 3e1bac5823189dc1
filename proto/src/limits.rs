//! Size limits, enforced before parsing (DESIGN.md "Limits").

/// Largest envelope accepted on any topic or from any file.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;
/// Largest JSON state report or event accepted by the controller.
pub const MAX_REPORT_BYTES: usize = 16 * 1024;
/// Longest name (fleet, ring, device, release name, rollout id, device class).
pub const MAX_NAME_LEN: usize = 128;
/// Longest URL.
pub const MAX_URL_LEN: usize = 2048;
/// Most signatures on one envelope.
pub const MAX_SIGNATURES: usize = 32;
/// Most keys in one trust root.
pub const MAX_KEYS: usize = 64;
/// Most entries in a list field (compatible classes, windows, checks, command args).
pub const MAX_LIST_LEN: usize = 64;
/// Longest single string inside a command line, path or check.
pub const MAX_ARG_LEN: usize = 1024;

use crate::error::{Reason, Rejection, Result};

/// Check a name: non-empty, bounded, and made of characters safe in topics and paths.
pub fn check_name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Rejection::malformed(format!("{field} is empty")));
    }
    if value.len() > MAX_NAME_LEN {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("{field} is longer than {MAX_NAME_LEN} bytes"),
        ));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || value == "."
        || value == ".."
    {
        return Err(Rejection::malformed(format!(
            "{field} {value:?} may hold only ASCII letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// Check a free string (path, URL, argument) against a length limit.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("{field} is longer than {max} bytes"),
        ));
    }
    Ok(())
}

/// Check a list's length.
pub fn check_list<T>(field: &str, value: &[T], max: usize) -> Result<()> {
    if value.len() > max {
        return Err(Rejection::new(
            Reason::TooLarge,
            format!("{field} has more than {max} entries"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("ring", "canary").is_ok());
        assert!(check_name("device", "dev-001.a_b").is_ok());
        assert_eq!(
            check_name("ring", "").unwrap_err().reason,
            Reason::Malformed
        );
        assert_eq!(
            check_name("ring", "a/b").unwrap_err().reason,
            Reason::Malformed
        );
        assert_eq!(
            check_name("ring", "+").unwrap_err().reason,
            Reason::Malformed
        );
        assert_eq!(
            check_name("ring", "..").unwrap_err().reason,
            Reason::Malformed
        );
        let long = "a".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            check_name("ring", &long).unwrap_err().reason,
            Reason::TooLarge
        );
    }
}
