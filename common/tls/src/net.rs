//! gRPC (tonic) over tokio-rustls: tonic's own TLS takes no custom certificate verifier, so the
//! servers accept TLS themselves ([`TlsIncoming`], fed to `serve_with_incoming_shutdown`) and
//! the clients connect through [`TlsConnector`] (given to `Endpoint::connect_with_connector`,
//! with an `http://` URI: the connector does the TLS).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http::Uri;
use tracing::{debug, warn};

/// Time a peer has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted TLS connections, for tonic's `serve_with_incoming_shutdown`. Handshakes run
/// concurrently (a slow or hostile peer does not hold up the others); refused handshakes are
/// logged and never reach the server. The accept loop ends when the stream is dropped.
pub type TlsIncoming = ReceiverStream<Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>>;

/// Starts accepting TLS connections on `listener` with `config`. `channel` names the service
/// in logs. Must be called inside a tokio runtime.
pub fn tls_incoming(listener: TcpListener, config: Arc<rustls::ServerConfig>, channel: &'static str) -> TlsIncoming {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                () = tx.closed() => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(channel, error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => warn!(channel, %remote, error = %e, "TLS handshake refused"),
                    Err(_) => debug!(channel, %remote, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Connects TCP then TLS to the URI's host and port, and verifies the server's certificate for
/// a fixed name (the peer's configured name, not the address's host).
#[derive(Clone)]
pub struct TlsConnector {
    config: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
}

impl TlsConnector {
    /// A connector presenting the client certificate of `config` and expecting `server_name`.
    pub fn new(config: Arc<rustls::ClientConfig>, server_name: ServerName<'static>) -> Self {
        Self { config, server_name }
    }
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, std::io::Error>> + Send>>;

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (config, server_name) = (self.config.clone(), self.server_name.clone());
        Box::pin(async move {
            let authority = uri.authority().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("no host:port in {uri}"))
            })?;
            let port = authority.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((authority.host().trim_matches(['[', ']']), port)).await?;
            let _ = tcp.set_nodelay(true);
            let tls = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}
