//! Paths inside a space, and the rules that make one valid.
//!
//! Every path foldercast handles is relative to a space root: it starts with `/`, its segments are
//! separated by `/`. Validation happens once, when an event or a client frame is decoded, so the
//! rest of the pipeline can treat a [`SpacePath`] as trusted: no `..` can escape a watch filter and
//! no empty segment can make two spellings of one folder.

use std::fmt;

use serde::{Serialize, Serializer};

/// Longest path accepted, in characters (Unicode scalar values), which is what the schemas'
/// `maxLength` counts; at most 16 KiB of UTF-8.
pub const MAX_PATH_CHARS: usize = 4096;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with '/'")]
    NotAbsolute,
    #[error("path is longer than {MAX_PATH_CHARS} characters")]
    TooLong,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path has an empty segment")]
    EmptySegment,
    #[error("path has a '.' or '..' segment")]
    DotSegment,
}

/// A validated, normalised path relative to a space root (`/` is the root itself).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpacePath(String);

impl SpacePath {
    /// The space root, `/`.
    pub fn root() -> Self {
        SpacePath("/".to_owned())
    }

    /// Validates `raw` and drops one trailing `/`.
    pub fn parse(raw: &str) -> Result<Self, PathError> {
        // Bytes first: no need to count the characters of what is short in any encoding.
        if raw.len() > MAX_PATH_CHARS && raw.chars().count() > MAX_PATH_CHARS {
            return Err(PathError::TooLong);
        }
        if !raw.starts_with('/') {
            return Err(PathError::NotAbsolute);
        }
        if raw.contains('\0') {
            return Err(PathError::Nul);
        }
        if raw == "/" {
            return Ok(Self::root());
        }
        let trimmed = raw.strip_suffix('/').unwrap_or(raw);
        for segment in trimmed[1..].split('/') {
            match segment {
                "" => return Err(PathError::EmptySegment),
                "." | ".." => return Err(PathError::DotSegment),
                _ => {}
            }
        }
        Ok(SpacePath(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0 == "/"
    }

    /// The folder that contains this path; `None` for the root.
    pub fn parent(&self) -> Option<SpacePath> {
        parent_str(&self.0).map(|p| SpacePath(p.to_owned()))
    }

    /// Every folder above this path, nearest first, ending with `/`; empty for the root.
    pub fn ancestors(&self) -> impl Iterator<Item = &str> {
        std::iter::successors(parent_str(&self.0), |p| parent_str(p))
    }

    /// True when `self` is `other` or lies below it (`/a/b` is within `/a`, `/ab` is not).
    pub fn is_within(&self, other: &SpacePath) -> bool {
        is_within(&self.0, &other.0)
    }
}

/// `path` is `folder` or below it, on already-validated strings.
pub fn is_within(path: &str, folder: &str) -> bool {
    if folder == "/" {
        return true;
    }
    match path.strip_prefix(folder) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

pub(crate) fn parent_str(path: &str) -> Option<&str> {
    if path == "/" {
        return None;
    }
    match path.rfind('/') {
        Some(0) => Some("/"),
        Some(i) => Some(&path[..i]),
        None => None,
    }
}

impl fmt::Display for SpacePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for SpacePath {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SpacePath {
        SpacePath::parse(s).unwrap()
    }

    #[test]
    fn accepts_and_normalises() {
        assert_eq!(p("/").as_str(), "/");
        assert_eq!(p("/a").as_str(), "/a");
        assert_eq!(p("/a/b/").as_str(), "/a/b");
        assert_eq!(p("/a b/ü.txt").as_str(), "/a b/ü.txt");
        assert_eq!(
            p("/...").as_str(),
            "/...",
            "three dots is a name, not a dot segment"
        );
    }

    #[test]
    fn rejects_bad_paths() {
        assert_eq!(SpacePath::parse(""), Err(PathError::NotAbsolute));
        assert_eq!(SpacePath::parse("a/b"), Err(PathError::NotAbsolute));
        assert_eq!(SpacePath::parse("//"), Err(PathError::EmptySegment));
        assert_eq!(SpacePath::parse("/a//b"), Err(PathError::EmptySegment));
        assert_eq!(SpacePath::parse("/a//"), Err(PathError::EmptySegment));
        assert_eq!(SpacePath::parse("/a/./b"), Err(PathError::DotSegment));
        assert_eq!(SpacePath::parse("/a/.."), Err(PathError::DotSegment));
        assert_eq!(SpacePath::parse("/."), Err(PathError::DotSegment));
        assert_eq!(SpacePath::parse("/a\0b"), Err(PathError::Nul));
        let long = format!("/{}", "x".repeat(MAX_PATH_CHARS));
        assert_eq!(SpacePath::parse(&long), Err(PathError::TooLong));
        let limit = format!("/{}", "x".repeat(MAX_PATH_CHARS - 1));
        assert!(SpacePath::parse(&limit).is_ok());
        // Characters, as the schemas count: 4,095 three-byte characters are within the limit.
        let wide = format!("/{}", "€".repeat(MAX_PATH_CHARS - 1));
        assert!(SpacePath::parse(&wide).is_ok());
        let too_wide = format!("/{}", "€".repeat(MAX_PATH_CHARS));
        assert_eq!(SpacePath::parse(&too_wide), Err(PathError::TooLong));
    }

    #[test]
    fn ancestors_nearest_first_up_to_root() {
        let deep = p("/f1/f2/f3/f4/report.pdf");
        let a: Vec<&str> = deep.ancestors().collect();
        assert_eq!(a, vec!["/f1/f2/f3/f4", "/f1/f2/f3", "/f1/f2", "/f1", "/"]);
        assert_eq!(p("/top").ancestors().collect::<Vec<_>>(), vec!["/"]);
        assert_eq!(p("/").ancestors().count(), 0);
        assert_eq!(p("/a/b").parent(), Some(p("/a")));
        assert_eq!(p("/").parent(), None);
    }

    #[test]
    fn within_respects_segment_boundaries() {
        assert!(p("/a/b").is_within(&p("/a")));
        assert!(p("/a").is_within(&p("/a")));
        assert!(p("/a").is_within(&p("/")));
        assert!(p("/").is_within(&p("/")));
        assert!(!p("/ab").is_within(&p("/a")));
        assert!(!p("/a").is_within(&p("/a/b")));
        assert!(!p("/").is_within(&p("/a")));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any string: no panic; an accepted path is canonical (parsing it again gives
            /// itself), has no empty or dot segment, and its ancestors are its proper prefixes
            /// ending at the root.
            #[test]
            fn accepted_paths_round_trip(raw in "(/[a-z.]{0,3}){0,6}/?|\\PC{0,40}") {
                if let Ok(path) = SpacePath::parse(&raw) {
                    let again = SpacePath::parse(path.as_str());
                    prop_assert_eq!(again.as_ref(), Ok(&path));
                    prop_assert!(path.as_str() == "/" || !path.as_str().ends_with('/'));
                    prop_assert!(!path.as_str().contains("//"));
                    let ancestors: Vec<&str> = path.ancestors().collect();
                    let depth = path.as_str().matches('/').count();
                    prop_assert_eq!(ancestors.len(), if path.as_str() == "/" { 0 } else { depth });
                    for a in &ancestors {
                        prop_assert!(path.as_str().starts_with(a));
                    }
                    if let Some(last) = ancestors.last() {
                        prop_assert_eq!(*last, "/");
                    }
                }
            }
        }
    }
}
