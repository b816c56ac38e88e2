//! TLS to PostgreSQL, with libpq's `sslmode` and `sslrootcert`.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` and checks nothing
//! itself; the check is the connector's. So the two settings are taken out
//! of the URL (tokio-postgres would refuse `verify-full` and an unknown
//! `sslrootcert`), and one rustls connector is built to match:
//!
//! | sslmode | TLS | certificate checked |
//! | --- | --- | --- |
//! | `disable` | never | - |
//! | `prefer` (libpq's default) | if the server offers it | no |
//! | `require` | always | no |
//! | `verify-ca` | always | chain to a trusted CA |
//! | `verify-full` | always | chain, and the host name |
//!
//! The trusted CAs are `sslrootcert`'s PEM file, or the Mozilla roots
//! (webpki-roots) without one. Unlike libpq, `require` with a root
//! certificate file does not verify the chain: say `verify-ca`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::tls::SslMode;

/// The connector for `mode`, trusting `rootcert`'s CAs (or the Mozilla
/// roots) where it verifies.
pub fn connector(mode: SslMode, rootcert: Option<&Path>) -> Result<MakeRustlsConnect> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS for PostgreSQL")?;
    let chain = match mode {
        SslMode::Disable | SslMode::Prefer | SslMode::Require => None,
        SslMode::VerifyCa | SslMode::VerifyFull => Some(
            WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots(rootcert)?),
                provider.clone(),
            )
            .build()
            .context("TLS for PostgreSQL: the trusted certificates")?,
        ),
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, chain) {
        (SslMode::VerifyFull, Some(webpki)) => webpki,
        (_, chain) => Arc::new(NameUnchecked { provider, chain }),
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn roots(rootcert: Option<&Path>) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    let Some(path) = rootcert else {
        store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        return Ok(store);
    };
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<_, _>>())
        .with_context(|| format!("reading sslrootcert {}", path.display()))?;
    if certificates.is_empty() {
        bail!("sslrootcert {} holds no PEM certificate", path.display());
    }
    let (added, ignored) = store.add_parsable_certificates(certificates);
    if added == 0 {
        bail!(
            "sslrootcert {}: none of its {ignored} certificates could be used",
            path.display()
        );
    }
    Ok(store)
}

/// Every mode but `verify-full`: the host name is not checked, and the
/// chain only with `verify-ca` (`chain` set); `prefer` and `require`
/// encrypt without authenticating the server. The handshake's signatures
/// are checked either way.
#[derive(Debug)]
struct NameUnchecked {
    provider: Arc<CryptoProvider>,
    chain: Option<Arc<WebPkiServerVerifier>>,
}

impl ServerCertVerifier for NameUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
