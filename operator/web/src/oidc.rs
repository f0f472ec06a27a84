//! What the API (bearer tokens) and the gateway (ID tokens from the code flow) agree on when
//! they check an OIDC token: which signature algorithms may be used (asymmetric only, so a
//! token cannot pick an HMAC "key" out of the public JWKS) and which `amr` values count as a
//! second factor.

use jsonwebtoken::Algorithm;

/// Signature algorithms accepted in a token's header.
pub const ALLOWED_ALGORITHMS: [Algorithm; 7] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// `amr` values that count as a second factor.
pub const MFA_METHODS: [&str; 3] = ["mfa", "otp", "hwk"];

/// Whether `amr` names a second factor.
pub fn has_mfa(amr: &[String]) -> bool {
    amr.iter().any(|m| MFA_METHODS.contains(&m.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_asymmetric_algorithms_and_second_factors() {
        assert!(
            !ALLOWED_ALGORITHMS.iter().any(|a| matches!(a, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512))
        );
        assert!(has_mfa(&["pwd".into(), "otp".into()]));
        assert!(!has_mfa(&["pwd".into()]));
    }
}
