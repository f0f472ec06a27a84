//! The researchers' door: a browser remote-desktop gateway. People sign in with the site's
//! OIDC issuer (authorization code + PKCE, MFA), pick one of their workspaces, and get the
//! upstream noVNC client talking through a WebSocket to an RFB proxy that authenticates to the
//! workspace desktop itself and filters every message both ways ([`rfb`]).

pub mod rfb;
