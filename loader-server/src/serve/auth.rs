//! Bearer tokens (`--auth-token-file`): the accepted set, reloaded on SIGHUP, and the check
//! every Loader call passes before it reaches the service. Tokens never reach a log line, an
//! error message or a metric.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock, atomic::Ordering::Relaxed},
};

use subtle::ConstantTimeEq;
use tonic::{Request, Status, service::Interceptor};

use super::{connection::ConnInfo, stats::Stats};

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("cannot read --auth-token-file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file holds no token.
    #[error("--auth-token-file {} holds no token; put one token per line", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// The accepted tokens and the file they come from.
pub struct Tokens {
    path: PathBuf,
    accepted: RwLock<Arc<Vec<Vec<u8>>>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens").field("path", &self.path).field("count", &self.current().len()).finish()
    }
}

impl Tokens {
    /// Reads the tokens in `path`.
    ///
    /// # Errors
    /// [`TokenFileError`] naming the file when it cannot be read or holds no token.
    pub fn load(path: &Path) -> Result<Tokens, TokenFileError> {
        let accepted = read_tokens(path)?;
        Ok(Tokens { path: path.to_owned(), accepted: RwLock::new(Arc::new(accepted)) })
    }

    /// Reads the file again; on an error the tokens in use stay.
    ///
    /// # Errors
    /// [`TokenFileError`] naming the file.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let accepted = read_tokens(&self.path)?;
        let count = accepted.len();
        *self.accepted.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(accepted);
        Ok(count)
    }

    /// The token file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn current(&self) -> Arc<Vec<Vec<u8>>> {
        self.accepted.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Whether `token` is one of the accepted ones, compared in constant time per token.
    pub fn accepts(&self, token: &[u8]) -> bool {
        self.current().iter().fold(false, |found, accepted| found | bool::from(accepted.as_slice().ct_eq(token)))
    }
}

fn read_tokens(path: &Path) -> Result<Vec<Vec<u8>>, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| TokenFileError::Read { path: path.to_owned(), error })?;
    let tokens: Vec<Vec<u8>> = text
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| line.as_bytes().to_vec())
        .collect();
    if tokens.is_empty() {
        return Err(TokenFileError::Empty { path: path.to_owned() });
    }
    Ok(tokens)
}

/// The check in front of the Loader service: passes every call when the loader has no token
/// file, otherwise only calls with `authorization: Bearer TOKEN` naming an accepted token.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    /// The accepted tokens; `None`: every call passes.
    tokens: Option<Arc<Tokens>>,
    /// Where refusals are counted and their log lines throttled.
    stats: Arc<Stats>,
}

impl TokenCheck {
    /// The check for `tokens`, counting refusals in `stats`.
    pub fn new(tokens: Option<Arc<Tokens>>, stats: Arc<Stats>) -> TokenCheck {
        TokenCheck { tokens, stats }
    }
}

impl Interceptor for TokenCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(tokens) = &self.tokens else {
            return Ok(request);
        };
        let presented =
            request.metadata().get("authorization").and_then(|value| value.to_str().ok()).and_then(bearer_token);
        let refusal = match presented {
            Some(token) if tokens.accepts(token.trim().as_bytes()) => return Ok(request),
            Some(_) => (
                "wrong token",
                "this loader does not accept the token sent; set the client's --auth-token-file or \
                 CONVEYOR_AUTH_TOKEN to a token in the loader's --auth-token-file",
            ),
            None => {
                ("no token", "this loader requires a token; set the client's --auth-token-file or CONVEYOR_AUTH_TOKEN")
            }
        };
        self.stats.auth_refused.fetch_add(1, Relaxed);
        let peer = ConnInfo::of(&request).and_then(|c| c.remote);
        if let Some(not_logged) = self.stats.auth_log.admit() {
            tracing::warn!(peer = ?peer, reason = refusal.0, not_logged, "refused an unauthenticated call");
        }
        Err(Status::unauthenticated(refusal.1))
    }
}

/// The token of an `authorization` value `Bearer TOKEN`; the scheme's case does not matter
/// (RFC 7235: `bearer`, `BEARER` are the same scheme).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case() {
        for value in ["Bearer t0k", "bearer t0k", "BEARER t0k", "bEaReR t0k"] {
            assert_eq!(bearer_token(value), Some("t0k"), "{value}");
        }
        for value in ["Basic t0k", "Bearert0k", "Bearer", ""] {
            assert_eq!(bearer_token(value), None, "{value}");
        }
    }

    #[test]
    fn token_file_ignores_comments_and_blank_lines_and_reloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tokens");
        std::fs::write(&path, "# readers\n\n  alpha  \nbeta\n").expect("write");
        let tokens = Tokens::load(&path).expect("load");
        assert!(tokens.accepts(b"alpha") && tokens.accepts(b"beta"));
        assert!(!tokens.accepts(b"alph") && !tokens.accepts(b"") && !tokens.accepts(b"# readers"));
        std::fs::write(&path, "gamma\n").expect("write");
        assert_eq!(tokens.reload().expect("reload"), 1);
        assert!(tokens.accepts(b"gamma") && !tokens.accepts(b"alpha"));
        std::fs::write(&path, "# nothing\n").expect("write");
        assert!(matches!(tokens.reload(), Err(TokenFileError::Empty { .. })));
        assert!(tokens.accepts(b"gamma"), "a failed reload keeps the tokens in use");
        let debug = format!("{tokens:?}");
        assert!(!debug.contains("gamma"), "Debug prints a token: {debug}");
    }
}
