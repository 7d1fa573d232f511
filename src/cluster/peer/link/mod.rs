//! The peer link's two ends: [`PeerServer`] takes streams on the private peer listener and hands
//! each authenticated request to a [`PeerHandler`]; [`PeerClient`] opens a stream on the owner.
//!
//! One TLS connection carries one stream. The dialer sends the signed header and waits for the
//! status; only after OK does it hand the stream to its caller, so on any refusal nothing of the
//! visitor's was sent and the caller may try another member. The owner checks, in order: the
//! client certificate (in the handshake), the header's HMAC, its time and nonce, the op; then
//! the handler opens the stream, the owner answers OK and splices bytes both ways, each
//! direction closed on its own (a FIN, sent as TLS close_notify, is a channel EOF).
//!
//! The dialer keeps a few connections per peer with TCP and TLS done (warm); a stream taken
//! from them dials its replacement at once, and a replacement that cannot get through within
//! the connect timeout fails the stream too, so a peer cut off never holds a visitor for longer.

pub(crate) mod client;
mod frame;
pub(crate) mod server;

#[cfg(test)]
mod tests;
