//! The loader's TLS settings from `--tls-cert`, `--tls-key` and `--tls-client-ca`, and the
//! start-up check of its own certificate's validity dates (rustls serves an expired certificate
//! without a word; every client then fails its handshake with "certificate expired").

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::{Config, ServeError};

/// A certificate this close to its end is warned about at start-up.
const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// The TLS settings of `--tls-cert`, `--tls-key` and `--tls-client-ca`, or `None` without them.
///
/// # Errors
/// [`ServeError::TlsFile`] or [`ServeError::NotPem`] naming the flag and the file.
pub fn tls_config(config: &Config) -> Result<Option<ServerTlsConfig>, ServeError> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let mut tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(read_pem("--tls-cert", cert)?, read_pem("--tls-key", key)?))
        .timeout(config.handshake_timeout);
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read_pem("--tls-client-ca", ca)?));
    }
    Ok(Some(tls))
}

fn read_pem(flag: &'static str, path: &Path) -> Result<Vec<u8>, ServeError> {
    let pem = std::fs::read(path).map_err(|error| ServeError::TlsFile { flag, path: path.to_owned(), error })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN ") {
        return Err(ServeError::NotPem { flag, path: path.to_owned() });
    }
    Ok(pem)
}

/// Logs a warning when `--tls-cert` is expired, not yet valid, or expires within a week.
pub fn warn_if_not_valid(config: &Config) {
    let Some(path) = &config.tls_cert else { return };
    let Ok(pem) = std::fs::read(path) else { return };
    if let Some(problem) = validity_problem(&pem, SystemTime::now()) {
        tracing::warn!(cert = %path.display(), "--tls-cert {}: {problem}", path.display());
    }
}

/// What is wrong with the validity dates of the first certificate in `pem` at `now`: expired,
/// not yet valid, or expiring within a week; `None` when it is valid for longer, or when it
/// cannot be parsed here (the TLS handshake reports that).
pub fn validity_problem(pem: &[u8], now: SystemTime) -> Option<String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let validity = cert.validity();
    let now = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
    let renew = "clients will refuse it; give the loader a current certificate";
    if now < not_before {
        let wait = days(not_before - now);
        Some(format!("is not valid until {} (in {wait}); {renew}, or check this host's clock", validity.not_before))
    } else if now > not_after {
        Some(format!("expired on {} ({} ago); {renew}", validity.not_after, days(now - not_after)))
    } else if not_after - now < EXPIRY_WARNING.as_secs() as i64 {
        Some(format!(
            "expires on {} (in {}); renew it before then and restart the loader",
            validity.not_after,
            days(not_after - now)
        ))
    } else {
        None
    }
}

fn days(seconds: i64) -> String {
    match seconds / 86_400 {
        0 => format!("{} hours", seconds / 3600),
        1 => "1 day".to_owned(),
        n => format!("{n} days"),
    }
}
