//! TLS client settings shared by the Postgres and Redis tiers: the roots a server certificate
//! must chain to (a private CA's PEM file, or the public web roots) and an optional client
//! certificate, built on rustls with the ring provider.

use std::sync::Arc;

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};

/// A client configuration trusting `ca_file` (or the public roots when `None`), presenting
/// `client_cert` (chain file, key file) when given. Errors name the file and the cause.
pub fn client_config(
    ca_file: Option<&str>,
    client_cert: Option<(&str, &str)>,
) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| format!("{path}: {e}"))?;
            for cert in certs {
                let cert = cert.map_err(|e| format!("{path}: {e}"))?;
                roots.add(cert).map_err(|e| format!("{path}: {e}"))?;
            }
            if roots.is_empty() {
                return Err(format!("{path}: no certificate in the file"));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
    match client_cert {
        None => Ok(builder.with_no_client_auth()),
        Some((chain, key)) => {
            let certs = CertificateDer::pem_file_iter(chain)
                .map_err(|e| format!("{chain}: {e}"))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{chain}: {e}"))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
            builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| format!("client certificate: {e}"))
        }
    }
}
