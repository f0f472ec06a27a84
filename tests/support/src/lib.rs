//! What noexit's test suites share, so each piece of harness exists once: a test CA and the
//! certificates tests need ([`pki`]), a fake OpenID Connect issuer ([`oidc`]), bounded polling
//! ([`poll`]), loopback listeners ([`net`]), network namespaces and veth links ([`netns`]),
//! child processes and the workspace's binaries ([`process`]), RFB (VNC) handshakes for fake
//! desktops and the browser's side of the gateway ([`rfb`]), the pod agent's configuration
//! ([`agent`]), headless Chromium scenarios ([`browser`]), and the CI rule for missing system
//! tools ([`deps`]).
//!
//! A dev-dependency only: no shipped binary links it. Helpers panic on failure, as the tests
//! using them would.

pub mod agent;
pub mod browser;
pub mod deps;
pub mod net;
pub mod netns;
pub mod oidc;
pub mod pki;
pub mod poll;
pub mod process;
pub mod rfb;
