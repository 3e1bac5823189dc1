//! `ringcast-io`: the I/O that both Ringcast daemons share, so that neither links the other.
//!
//! - [`mqtt`]: one MQTT session type over rumqttc that speaks MQTT 5 (the default: the client
//!   announces a Maximum Packet Size, so a broker never sends it a larger packet) or MQTT 3.1.1
//!   (older brokers, NATS), with the same events and requests either way.
//! - [`ports`]: local ports reserved without the bind-then-release race, for servers told
//!   their port before they bind (the embedded broker, a test's own Mosquitto).
//! - [`fs`]: crash-safe file writes (temp file, fsync, rename, fsync the directory) and the
//!   small file helpers built on them, with one error type, [`fs::FsError`].
//! - `sled` (feature `sled`): opening a sled database, waiting for a lock a closing `Db`
//!   still holds.
//!
//! The crate holds mechanisms, not rules: what a Ringcast message means is `ringcast-proto`'s
//! business, what to do with it the agent's and the controller's.

pub mod fs;
pub mod mqtt;
pub mod ports;
#[cfg(feature = "sled")]
pub mod sled;
