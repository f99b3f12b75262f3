//! Who is calling: SAE and KME IDs, the SAE ID read from a verified client certificate, and
//! which KME owns which key unit.

use uuid::Uuid;

/// An SAE ID (format not fixed by the standard; compared byte for byte).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SaeId(pub String);

impl std::fmt::Display for SaeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A KME ID.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct KmeId(pub String);

impl std::fmt::Display for KmeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where the SAE ID is read in a client certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentitySource {
    /// The subject's common name (the first CN).
    #[default]
    Cn,
    /// The first URI subject alternative name, taken whole (e.g. `urn:sae:gw-1`).
    UriSan,
}

/// Why no SAE ID could be read from a certificate.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The certificate does not parse as X.509.
    #[error("client certificate does not parse: {0}")]
    Parse(String),
    /// The certificate has no usable common name.
    #[error("client certificate has no subject common name")]
    NoCommonName,
    /// The certificate has no URI subject alternative name.
    #[error("client certificate has no URI subject alternative name")]
    NoUriSan,
}

/// Reads the SAE ID from a DER certificate whose chain rustls has already verified.
pub fn sae_id_from_certificate(der: &[u8], source: IdentitySource) -> Result<SaeId, IdentityError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    match source {
        IdentitySource::Cn => {
            let cn = cert.subject().iter_common_name().next().ok_or(IdentityError::NoCommonName)?;
            let cn = cn.as_str().map_err(|_| IdentityError::NoCommonName)?;
            if cn.is_empty() {
                return Err(IdentityError::NoCommonName);
            }
            Ok(SaeId(cn.to_owned()))
        }
        IdentitySource::UriSan => {
            let san = cert.subject_alternative_name().map_err(|e| IdentityError::Parse(e.to_string()))?;
            let san = san.ok_or(IdentityError::NoUriSan)?;
            san.value
                .general_names
                .iter()
                .find_map(|name| match name {
                    GeneralName::URI(uri) if !uri.is_empty() => Some(SaeId((*uri).to_owned())),
                    _ => None,
                })
                .ok_or(IdentityError::NoUriSan)
        }
    }
}

/// Which of the two KMEs this is; decides which key units it picks first.
///
/// Each KME owns half of the units (by the last byte of their IDs) and picks its own first, so
/// that two KMEs serving masters at once rarely reach for the same unit. Ownership is a
/// preference, not a right: a KME short of its own units borrows the peer's, or one-way use (all
/// masters at one KME) would leave the other half of the store unusable until it filled the store
/// and stopped the link. What stops two KMEs from handing out one unit is the reservation: a
/// KME reserves at the peer only units that the peer's own Get key does not hold in flight, and
/// removes them from its pool in the same step ([`crate::KmeState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KmeSide {
    /// The KME of Alice's daemon: owns units whose ID's last byte is even.
    Alice,
    /// The KME of Bob's daemon: owns units whose ID's last byte is odd.
    Bob,
}

impl KmeSide {
    /// The KME owning the unit `unit_id` (the one that picks it first).
    pub fn owner_of(unit_id: &Uuid) -> Self {
        if unit_id.as_bytes()[15].is_multiple_of(2) { Self::Alice } else { Self::Bob }
    }

    /// True when this KME owns `unit_id`.
    pub fn owns(self, unit_id: &Uuid) -> bool {
        Self::owner_of(unit_id) == self
    }

    /// The other KME.
    pub fn peer(self) -> Self {
        match self {
            Self::Alice => Self::Bob,
            Self::Bob => Self::Alice,
        }
    }
}
