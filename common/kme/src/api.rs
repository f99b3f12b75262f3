//! The JSON data formats of ETSI GS QKD 014 (field names exactly as the standard spells them),
//! the parsing of requests into typed values, and the one conversion of errors into HTTP
//! answers (200, 400, 401 and 503 only).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};
use uuid::Uuid;
use zeroize::Zeroizing;

use super::identity::SaeId;

/// Verbatim 400 message of the standard: a size that is not a multiple of 8.
pub const MSG_SIZE_NOT_MULTIPLE_OF_8: &str = "size shall be a multiple of 8";
/// Verbatim 400 message of the standard: an `extension_mandatory` entry this KME does not know.
pub const MSG_EXTENSION_MANDATORY_UNSUPPORTED: &str = "not all extension_mandatory parameters are supported";
/// Verbatim 400 message of the standard: a key ID unknown, already delivered or of another pair.
pub const MSG_KEYS_NOT_FOUND: &str = "one or more keys specified are not found on KME";
/// 503 when the keys come from a simulated quantum channel and the KME is not configured to
/// serve them (this implementation's message).
pub const MSG_SIMULATED_KEYS: &str = "this KME's keys come from a simulated quantum channel (simulator, emulator or replay) and are not secret; it serves them only with allow_simulated_keys = true in its [kme] section";

/// An error answer: the HTTP status and the standard's Error body.
#[derive(Debug, thiserror::Error)]
pub enum EtsiError {
    /// 400: the request is malformed or asks for something this KME does not do.
    #[error("{message}")]
    BadRequest {
        /// The Error body's `message`.
        message: String,
        /// The Error body's `details` (objects of one name/value pair each).
        details: Vec<Value>,
    },
    /// 401: the caller may not do this.
    #[error("{0}")]
    Unauthorized(String),
    /// 503: the KME cannot serve now (not enough key, peer KME unreachable, store failure).
    #[error("{0}")]
    Unavailable(String),
}

impl EtsiError {
    /// A 400 answer without details.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest { message: message.into(), details: Vec::new() }
    }

    /// The HTTP status code of this error.
    pub fn status_code(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The standard's Error body.
    pub fn body(&self) -> ErrorBody {
        let details = match self {
            Self::BadRequest { details, .. } if !details.is_empty() => Some(details.clone()),
            _ => None,
        };
        ErrorBody { message: self.to_string(), details }
    }
}

impl IntoResponse for EtsiError {
    /// The status code with a JSON Error body (401 included, although the standard gives it
    /// none, because common clients parse JSON on every non-200 answer).
    fn into_response(self) -> Response {
        (self.status_code(), axum::Json(self.body())).into_response()
    }
}

/// The Error data format.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub message: String,
    /// More information, as objects of one name/value pair each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Vec<Value>>,
}

/// The Status data format (answer of Get status).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StatusBody {
    /// This KME's ID.
    #[serde(rename = "source_KME_ID")]
    pub source_kme_id: String,
    /// The slave's KME ID.
    #[serde(rename = "target_KME_ID")]
    pub target_kme_id: String,
    /// The caller's SAE ID, read from its certificate.
    #[serde(rename = "master_SAE_ID")]
    pub master_sae_id: String,
    /// The slave SAE ID of the path.
    #[serde(rename = "slave_SAE_ID")]
    pub slave_sae_id: String,
    /// Default key size, bits.
    pub key_size: u32,
    /// Keys of `key_size` this KME can serve now (capped at `max_key_count`).
    pub stored_key_count: u64,
    /// Most keys the KME announces as stored.
    pub max_key_count: u64,
    /// Most keys per Get key request.
    pub max_key_per_request: u32,
    /// Largest key size, bits.
    pub max_key_size: u32,
    /// Smallest key size, bits.
    pub min_key_size: u32,
    /// Most additional slave SAEs per request (0: no multicast).
    #[serde(rename = "max_SAE_ID_count")]
    pub max_sae_id_count: u32,
    /// Extension (not used by this KME).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_extension: Option<Value>,
}

/// The Key container data format (answer of Get key and Get key with key IDs).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KeyContainer {
    /// The keys.
    pub keys: Vec<Key>,
    /// Extension (not used by this KME).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_container_extension: Option<Value>,
}

/// One key of a key container.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Key {
    /// The key ID (a UUID, hyphenated lowercase).
    #[serde(rename = "key_ID")]
    pub key_id: Uuid,
    /// The key, base64 (RFC 4648, padded).
    pub key: Base64Key,
    /// Extension of the key ID (not used by this KME).
    #[serde(rename = "key_ID_extension", default, skip_serializing_if = "Option::is_none")]
    pub key_id_extension: Option<Value>,
    /// Extension of the key (not used by this KME).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_extension: Option<Value>,
}

impl Key {
    /// A key with its bytes encoded.
    pub fn new(key_id: Uuid, bytes: &[u8]) -> Self {
        Self { key_id, key: Base64Key::encode(bytes), key_id_extension: None, key_extension: None }
    }
}

/// Key bytes in base64, wiped on drop and hidden from `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Base64Key(pub Zeroizing<String>);

impl Base64Key {
    /// Encodes `bytes` (standard alphabet, padded).
    pub fn encode(bytes: &[u8]) -> Self {
        use base64::Engine;
        Self(Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(bytes)))
    }

    /// Decodes the key bytes; `None` when the text is not padded standard base64.
    pub fn decode(&self) -> Option<Zeroizing<Vec<u8>>> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(self.0.as_bytes()).ok().map(Zeroizing::new)
    }
}

impl std::fmt::Debug for Base64Key {
    /// Prints the length only, never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Base64Key({} chars)", self.0.len())
    }
}

impl serde::Serialize for Base64Key {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Base64Key {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(Self(Zeroizing::new(String::deserialize(deserializer)?)))
    }
}

/// A Get key request, parsed but not yet checked against the KME's limits.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyRequest {
    /// Number of keys (default 1); any integer, checked later.
    pub number: Option<i64>,
    /// Key size in bits (default `key_size`); any integer, checked later.
    pub size: Option<i64>,
    /// Additional slave SAEs (multicast).
    pub additional_slave_sae_ids: Vec<SaeId>,
    /// Mandatory extensions, one name/value pair per object.
    pub extension_mandatory: Vec<Map<String, Value>>,
    /// Optional extensions, one name/value pair per object.
    pub extension_optional: Vec<Map<String, Value>>,
}

impl KeyRequest {
    /// Parses a POST body: empty (or blank) means all defaults; otherwise a JSON object whose
    /// unknown fields are ignored. `null` counts as absent.
    pub fn from_json(body: &[u8]) -> Result<Self, EtsiError> {
        let Some(object) = json_object(body)? else {
            return Ok(Self::default());
        };
        let mut request = Self::default();
        for (name, value) in object {
            if value.is_null() {
                continue;
            }
            match name.as_str() {
                "number" => request.number = Some(json_integer("number", &value)?),
                "size" => request.size = Some(json_integer("size", &value)?),
                "additional_slave_SAE_IDs" => {
                    let Value::Array(items) = value else {
                        return Err(EtsiError::bad_request("additional_slave_SAE_IDs shall be an array of strings"));
                    };
                    for item in items {
                        let Value::String(id) = item else {
                            return Err(EtsiError::bad_request(
                                "additional_slave_SAE_IDs shall be an array of strings",
                            ));
                        };
                        request.additional_slave_sae_ids.push(SaeId(id));
                    }
                }
                "extension_mandatory" => request.extension_mandatory = extension_list("extension_mandatory", value)?,
                "extension_optional" => request.extension_optional = extension_list("extension_optional", value)?,
                _ => {}
            }
        }
        Ok(request)
    }

    /// Parses the query of a GET request (`number` and `size`; other parameters are ignored).
    pub fn from_query(pairs: &[(String, String)]) -> Result<Self, EtsiError> {
        let mut request = Self::default();
        for (name, value) in pairs {
            let slot = match name.as_str() {
                "number" => &mut request.number,
                "size" => &mut request.size,
                _ => continue,
            };
            if slot.is_some() {
                return Err(EtsiError::bad_request(format!("{name} is given more than once")));
            }
            let parsed = value
                .trim()
                .parse::<i64>()
                .map_err(|_| EtsiError::bad_request(format!("{name} shall be an integer")))?;
            *slot = Some(parsed);
        }
        Ok(request)
    }
}

/// Parses a Get key with key IDs POST body: `{"key_IDs":[{"key_ID": UUID}, ...]}` with at least
/// one ID, no ID twice; unknown fields and extensions are ignored.
pub fn key_ids_from_json(body: &[u8]) -> Result<Vec<Uuid>, EtsiError> {
    let Some(mut object) = json_object(body)? else {
        return Err(EtsiError::bad_request("request body shall hold key_IDs"));
    };
    let Some(Value::Array(items)) = object.remove("key_IDs") else {
        return Err(EtsiError::bad_request("key_IDs shall be an array of objects with a key_ID"));
    };
    let mut ids = Vec::with_capacity(items.len());
    for item in items {
        let Value::Object(mut item) = item else {
            return Err(EtsiError::bad_request("key_IDs shall be an array of objects with a key_ID"));
        };
        let Some(Value::String(id)) = item.remove("key_ID") else {
            return Err(EtsiError::bad_request("every entry of key_IDs shall have a key_ID string"));
        };
        ids.push(parse_key_id(&id)?);
    }
    check_key_ids(ids)
}

/// Parses the query of a Get key with key IDs GET request: exactly one `key_ID`.
pub fn key_ids_from_query(pairs: &[(String, String)]) -> Result<Vec<Uuid>, EtsiError> {
    let ids = pairs
        .iter()
        .filter(|(name, _)| name == "key_ID")
        .map(|(_, value)| parse_key_id(value))
        .collect::<Result<Vec<_>, _>>()?;
    if ids.len() > 1 {
        return Err(EtsiError::bad_request("GET accepts one key_ID; use POST for several"));
    }
    check_key_ids(ids)
}

fn check_key_ids(ids: Vec<Uuid>) -> Result<Vec<Uuid>, EtsiError> {
    if ids.is_empty() {
        return Err(EtsiError::bad_request("key_IDs shall name at least one key_ID"));
    }
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    if let Some(dup) = ids.iter().find(|id| !seen.insert(**id)) {
        return Err(EtsiError::bad_request(format!("key_ID {dup} is given more than once")));
    }
    Ok(ids)
}

/// Key IDs are hyphenated UUIDs (upper or lower case).
fn parse_key_id(text: &str) -> Result<Uuid, EtsiError> {
    let malformed = || EtsiError::bad_request(format!("key_ID {text:?} is not a UUID"));
    if text.len() != 36 {
        return Err(malformed());
    }
    Uuid::parse_str(text).map_err(|_| malformed())
}

/// `None` for an empty (or blank) body, else the JSON object it holds.
fn json_object(body: &[u8]) -> Result<Option<Map<String, Value>>, EtsiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(Some(object)),
        Ok(_) => Err(EtsiError::bad_request("request body shall be a JSON object")),
        Err(e) => Err(EtsiError::bad_request(format!("request body is not valid JSON: {e}"))),
    }
}

fn json_integer(name: &str, value: &Value) -> Result<i64, EtsiError> {
    value.as_i64().ok_or_else(|| EtsiError::bad_request(format!("{name} shall be an integer")))
}

fn extension_list(name: &str, value: Value) -> Result<Vec<Map<String, Value>>, EtsiError> {
    let wrong = || EtsiError::bad_request(format!("{name} shall be an array of objects"));
    let Value::Array(items) = value else {
        return Err(wrong());
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::Object(object) => Ok(object),
            _ => Err(wrong()),
        })
        .collect()
}
