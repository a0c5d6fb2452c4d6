//! Name and path validation, shared by the client (for early, friendly errors) and the server
//! (which re-validates everything: client-side checks are a courtesy, not a defence).

/// Longest file name in bytes (as in most POSIX filesystems).
pub const MAX_NAME_BYTES: usize = 255;
/// Longest volume name.
pub const MAX_VOLUME_NAME: usize = 64;
/// Longest account name.
pub const MAX_ACCOUNT_NAME: usize = 64;
/// Deepest path a request may name.
pub const MAX_PATH_DEPTH: usize = 256;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("empty name")]
    Empty,
    #[error("name {0:?} is not allowed")]
    Reserved(String),
    #[error("name contains '/'")]
    Slash,
    #[error("name contains a NUL byte")]
    Nul,
    #[error("name is {0} bytes; the limit is {MAX_NAME_BYTES}")]
    TooLong(usize),
    #[error("volume name {0:?} must be 1-64 characters of a-z, 0-9, '.', '-', '_' and start with a letter or digit")]
    BadVolume(String),
    #[error("account name {0:?} must be 1-64 characters of letters, digits, '.', '-', '_' and '@', and start with a letter or digit")]
    BadAccount(String),
    #[error("path is deeper than {MAX_PATH_DEPTH} components")]
    TooDeep,
}

/// Checks one directory entry name.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name == "." || name == ".." {
        return Err(NameError::Reserved(name.to_string()));
    }
    if name.contains('/') {
        return Err(NameError::Slash);
    }
    if name.contains('\0') {
        return Err(NameError::Nul);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    Ok(())
}

/// Checks a volume name: it becomes a directory under `/coda` and appears in URLs, so it is
/// restricted to a portable character set.
pub fn validate_volume_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VOLUME_NAME
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NameError::BadVolume(name.to_string()))
    }
}

/// Checks a new account's name: it is printed in listings and logs and passed on command lines,
/// so no control characters, spaces or leading '-'.
pub fn validate_account_name(name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ACCOUNT_NAME
        && name.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(NameError::BadAccount(name.to_string()))
    }
}

/// Splits a volume-relative path into validated components. Leading, trailing and repeated
/// slashes are ignored; `.` and `..` are refused rather than resolved, so a path can never leave
/// its volume.
///
/// Components are checked as they are split and the count stops at the limit, so a path of
/// megabytes of `a/` (a request field) costs no more than a path at the limit.
pub fn split_path(path: &str) -> Result<Vec<&str>, NameError> {
    let mut parts = Vec::new();
    for p in path.split('/').filter(|p| !p.is_empty()) {
        if parts.len() == MAX_PATH_DEPTH {
            return Err(NameError::TooDeep);
        }
        validate_name(p)?;
        parts.push(p);
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert!(matches!(validate_name("."), Err(NameError::Reserved(_))));
        assert!(matches!(validate_name(".."), Err(NameError::Reserved(_))));
        assert_eq!(validate_name("a/b"), Err(NameError::Slash));
        assert_eq!(validate_name("a\0b"), Err(NameError::Nul));
        assert_eq!(validate_name(&"x".repeat(256)), Err(NameError::TooLong(256)));
        assert!(validate_name(&"x".repeat(255)).is_ok());
        assert!(validate_name("index.html").is_ok());
    }

    #[test]
    fn paths_cannot_escape() {
        assert!(split_path("a/../b").is_err());
        assert!(split_path("./a").is_err());
        assert_eq!(split_path("/a//b/").unwrap(), vec!["a", "b"]);
        assert!(split_path("").unwrap().is_empty());
        assert_eq!(split_path(&"a/".repeat(MAX_PATH_DEPTH)).unwrap().len(), MAX_PATH_DEPTH);
        assert_eq!(split_path(&"a/".repeat(1 << 20)), Err(NameError::TooDeep));
    }

    #[test]
    fn volume_names() {
        assert!(validate_volume_name("www.example.com").is_ok());
        assert!(validate_volume_name("www").is_ok());
        for bad in ["", "-x", "A", "a b", "a/b", ".hidden"] {
            assert!(validate_volume_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn account_names() {
        for good in ["alice", "web-master", "Bob_2", "ops@example.com", "a.b"] {
            assert!(validate_account_name(good).is_ok(), "{good:?} refused");
        }
        let long = "x".repeat(65);
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "nl\nx",
            "tab\tx",
            "z\x1b[31m",
            "e\x7f",
            "a/b",
            "é",
            &long,
        ] {
            assert!(validate_account_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    proptest! {
        #[test]
        fn accepted_names_are_single_safe_components(name in "\\PC{0,300}") {
            if validate_name(&name).is_ok() {
                prop_assert!(!name.contains('/') && !name.contains('\0'));
                prop_assert!(name != "." && name != "..");
                prop_assert!(!name.is_empty() && name.len() <= MAX_NAME_BYTES);
            }
        }
    }
}
