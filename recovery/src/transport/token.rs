//! The shared secret that authenticates the two ends of a transport.
//!
//! 32 random bytes, written as 64 hex digits. Both hosts get it from the
//! environment (`REMEM_TOKEN`) or from a file of mode 0600 named by
//! `REMEM_TOKEN_FILE`: never from the command line (other users can read a
//! process's argv), never in a log or an error message. The bytes are wiped
//! when the last copy is dropped.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use zeroize::Zeroizing;

use super::error::TokenError;

/// Token length in bytes.
const LEN: usize = 32;

/// The shared secret. `Debug` prints no byte of it; there is no `Display`.
#[derive(Clone)]
pub struct Token(Zeroizing<[u8; LEN]>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// The environment variable holding the token's hex digits.
    pub const ENV: &'static str = "REMEM_TOKEN";
    /// The environment variable naming a token file.
    pub const FILE_ENV: &'static str = "REMEM_TOKEN_FILE";

    /// A fresh random token.
    pub fn generate() -> Result<Token, TokenError> {
        let mut t = Zeroizing::new([0u8; LEN]);
        random(&mut t[..])?;
        Ok(Token(t))
    }

    /// From `REMEM_TOKEN`, else from the file `REMEM_TOKEN_FILE` names.
    pub fn from_env() -> Result<Token, TokenError> {
        if let Some(hex) = std::env::var_os(Token::ENV) {
            let hex = Zeroizing::new(hex.into_string().unwrap_or_default());
            return Token::from_hex(&hex, Token::ENV);
        }
        match std::env::var_os(Token::FILE_ENV) {
            Some(path) => Token::from_file(Path::new(&path)),
            None => Err(TokenError::Missing),
        }
    }

    /// From a file that holds the hex digits (surrounding whitespace is
    /// ignored) and that group and others cannot access.
    pub fn from_file(path: &Path) -> Result<Token, TokenError> {
        let file_err = |source| TokenError::File { path: path.to_owned(), source };
        let mut f = File::open(path).map_err(file_err)?;
        let mode = f.metadata().map_err(file_err)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(TokenError::Permissions { path: path.to_owned(), mode: mode & 0o7777 });
        }
        let mut text = Zeroizing::new(String::new());
        Read::by_ref(&mut f).take(1024).read_to_string(&mut text).map_err(file_err)?;
        Token::from_hex(text.trim(), &path.display().to_string())
    }

    /// From 64 hex digits; `origin` names where they came from, for errors.
    pub fn from_hex(hex: &str, origin: &str) -> Result<Token, TokenError> {
        let malformed = || TokenError::Malformed { origin: origin.to_owned() };
        let digits = hex.as_bytes();
        if digits.len() != 2 * LEN {
            return Err(malformed());
        }
        let mut t = Zeroizing::new([0u8; LEN]);
        for (byte, pair) in t.iter_mut().zip(digits.chunks_exact(2)) {
            let hi = hex_value(pair[0]).ok_or_else(malformed)?;
            let lo = hex_value(pair[1]).ok_or_else(malformed)?;
            *byte = hi << 4 | lo;
        }
        Ok(Token(t))
    }

    /// Writes the token to a new file of mode 0600 (refusing to overwrite).
    pub fn write_new_file(&self, path: &Path) -> Result<(), TokenError> {
        let file_err = |source| TokenError::File { path: path.to_owned(), source };
        let mut f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(file_err)?;
        let mut text = self.to_hex();
        text.push('\n');
        f.write_all(text.as_bytes()).map_err(file_err)?;
        f.sync_all().map_err(file_err)
    }

    /// The 64 hex digits, e.g. to put in a child process's environment.
    /// Keep them out of argv and logs.
    pub fn to_hex(&self) -> Zeroizing<String> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = Zeroizing::new(String::with_capacity(2 * LEN + 1));
        for b in self.0.iter() {
            s.push(DIGITS[usize::from(b >> 4)] as char);
            s.push(DIGITS[usize::from(b & 15)] as char);
        }
        s
    }

    /// Keyed BLAKE3 of `label` and `parts`, each length-prefixed so that no
    /// two different transcripts hash the same bytes.
    pub(crate) fn mac(&self, label: &[u8], parts: &[&[u8]]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        for p in std::iter::once(&label).chain(parts) {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        h.finalize()
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Fills `buf` with random bytes from the operating system.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), TokenError> {
    getrandom::fill(buf).map_err(|e| TokenError::Random(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp_path(name: &str) -> std::path::PathBuf {
        let mut r = [0u8; 8];
        random(&mut r).unwrap();
        std::env::temp_dir().join(format!("remem-token-{name}-{}", u64::from_le_bytes(r)))
    }

    #[test]
    fn hex_round_trip_and_redacted_debug() {
        let t = Token::generate().unwrap();
        let hex = t.to_hex();
        assert_eq!(hex.len(), 64);
        let u = Token::from_hex(&hex, "test").unwrap();
        assert_eq!(t.mac(b"l", &[b"x"]), u.mac(b"l", &[b"x"]));
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
        assert!(!format!("{t:?}").contains(&hex[..8]));
        let upper = hex.to_uppercase();
        assert!(Token::from_hex(&upper, "test").is_ok());
        for bad in ["", "00", &hex[1..], &format!("{}g", &hex[1..])] {
            let e = Token::from_hex(bad, "REMEM_TOKEN").unwrap_err();
            assert_eq!(e.to_string(), "the token from REMEM_TOKEN is not 64 hex digits");
        }
    }

    #[test]
    fn mac_separates_labels_parts_and_keys() {
        let t = Token::generate().unwrap();
        let other = Token::generate().unwrap();
        let base = t.mac(b"a", &[b"bc", b"d"]);
        assert_ne!(base, t.mac(b"a", &[b"b", b"cd"]));
        assert_ne!(base, t.mac(b"b", &[b"bc", b"d"]));
        assert_ne!(base, other.mac(b"a", &[b"bc", b"d"]));
    }

    #[test]
    fn files_must_be_private() {
        let t = Token::generate().unwrap();
        let path = temp_path("file");
        t.write_new_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let u = Token::from_file(&path).unwrap();
        assert_eq!(t.mac(b"l", &[]), u.mac(b"l", &[]));
        assert!(matches!(t.write_new_file(&path), Err(TokenError::File { .. })), "never overwrites");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Token::from_file(&path).unwrap_err();
        assert!(matches!(e, TokenError::Permissions { mode: 0o640, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(Token::from_file(&path), Err(TokenError::File { .. })));
    }
}
