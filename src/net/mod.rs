//! Networking shared by both protocols: accepting with admission, TLS, upstream dialling.

pub mod listener;
pub mod memory;
pub mod stream;
pub mod tls;
pub mod upstream;

/// TCP keepalive on a client or upstream socket, so peers that vanish without a FIN or RST
/// (node loss, NAT expiry) do not hold a session, a permit and an upstream backend forever.
pub fn set_keepalive(tcp: &tokio::net::TcpStream) {
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(60))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(6);
    let _ = socket2::SockRef::from(tcp).set_tcp_keepalive(&ka);
}
