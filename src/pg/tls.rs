//! TLS for both kinds of connection (rustls with the ring provider): the client configuration for
//! each certificate check libpq's sslmode implies, and the glue that lets tokio-postgres use it.

use std::future::Future;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How much of the server's certificate is checked, as libpq's sslmode spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertCheck {
    /// `require` / `prefer` without a root certificate: encryption only, like libpq.
    None,
    /// `verify-ca`: the chain must lead to the configured root; the host name is not checked.
    Chain,
    /// `verify-full`: chain and host name.
    Full,
}

/// A TLS configuration problem: unreadable or empty CA file, or no CA file where one is needed.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read the TLS root certificate file {path}: {source}")]
    ReadRoots { path: String, source: io::Error },
    #[error(
        "the TLS root certificate file {path} holds no usable PEM certificate; give a CA bundle in PEM form"
    )]
    NoRoots { path: String },
    #[error("certificate checks need a root certificate: set sslrootcert to the CA bundle (PEM)")]
    RootsMissing,
    #[error("TLS setup failed: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot read the TLS client {what} file {path}: {problem}")]
    ReadClient {
        what: &'static str,
        path: String,
        problem: String,
    },
    #[error(
        "the TLS client key file {path} has group or world access (mode {mode:04o}); like libpq, \
         stagingprop refuses it: chmod 0600 {path}"
    )]
    ExposedKey { path: String, mode: u32 },
}

/// A client certificate and its private key, both PEM files.
#[derive(Clone, Copy, Debug)]
pub struct ClientCert<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
}

/// Reads a client certificate chain and its key; the key file must not be readable by group
/// or others (0640 when owned by root, as libpq allows).
fn load_client_cert(
    client: ClientCert<'_>,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    TlsSetupError,
> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let read_error = |what: &'static str, path: &Path, problem: String| TlsSetupError::ReadClient {
        what,
        path: path.display().to_string(),
        problem,
    };
    let pem = std::fs::read(client.cert)
        .map_err(|e| read_error("certificate", client.cert, e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| read_error("certificate", client.cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(read_error(
            "certificate",
            client.cert,
            "it holds no PEM certificate".into(),
        ));
    }
    let meta =
        std::fs::metadata(client.key).map_err(|e| read_error("key", client.key, e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    let allowed = if meta.uid() == 0 { 0o037 } else { 0o077 };
    if mode & allowed != 0 {
        return Err(TlsSetupError::ExposedKey {
            path: client.key.display().to_string(),
            mode,
        });
    }
    let pem =
        std::fs::read(client.key).map_err(|e| read_error("key", client.key, e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| read_error("key", client.key, e.to_string()))?
        .ok_or_else(|| read_error("key", client.key, "it holds no PEM private key".into()))?;
    Ok((certs, key))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsSetupError::ReadRoots {
        path: shown.clone(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        let cert = cert.map_err(|source| TlsSetupError::ReadRoots {
            path: shown.clone(),
            source,
        })?;
        roots.add(cert).map_err(|_| TlsSetupError::NoRoots {
            path: shown.clone(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsSetupError::NoRoots { path: shown });
    }
    Ok(roots)
}

/// Builds the rustls client configuration for a certificate check.
pub fn client_config(
    check: CertCheck,
    root_cert: Option<&Path>,
    client_cert: Option<ClientCert<'_>>,
) -> Result<Arc<ClientConfig>, TlsSetupError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let verifier: Arc<dyn ServerCertVerifier> = match (check, root_cert) {
        (CertCheck::None, None) => Arc::new(EncryptionOnly {
            algorithms: provider.signature_verification_algorithms,
        }),
        (_, None) => return Err(TlsSetupError::RootsMissing),
        (check, Some(path)) => {
            let roots = Arc::new(load_roots(path)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            if check == CertCheck::Full {
                webpki
            } else {
                // libpq: with a root certificate present, `require` checks the chain like verify-ca.
                Arc::new(ChainOnly { inner: webpki })
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let (certs, key) = load_client_cert(client)?;
            builder.with_client_auth_cert(certs, key)?
        }
    };
    Ok(Arc::new(config))
}

/// Accepts any certificate but still checks handshake signatures: libpq's `require`.
#[derive(Debug)]
struct EncryptionOnly {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for EncryptionOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The full WebPKI check minus the host name: libpq's `verify-ca`.
#[derive(Debug)]
struct ChainOnly {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
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
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Runs the TLS handshake over an established socket (after the server accepted SSLRequest).
pub async fn handshake<S>(
    config: Arc<ClientConfig>,
    host: &str,
    socket: S,
) -> io::Result<TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    TlsConnector::from(config).connect(name, socket).await
}

/// Lets tokio-postgres connect with our rustls configuration.
#[derive(Clone)]
pub struct MakeRustls(pub Arc<ClientConfig>);

/// One pending TLS handshake for tokio-postgres.
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    host: String,
}

impl<S> tokio_postgres::tls::MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        Ok(RustlsConnect {
            config: self.0.clone(),
            host: domain.to_owned(),
        })
    }
}

impl<S> tokio_postgres::tls::TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let tls = handshake(self.config, &self.host, stream).await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS stream tokio-postgres can drive.
pub struct RustlsStream<S>(TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        // SCRAM channel binding is optional (channel_binding=prefer); not offered yet.
        tokio_postgres::tls::ChannelBinding::none()
    }
}
