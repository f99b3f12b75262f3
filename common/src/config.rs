//! The daemons' configuration: TOML files, overridden by environment variables
//! (`ALICE__SECTION__KEY`, `BOB__SECTION__KEY`) and command-line flags. Unknown keys are errors.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use qkd_core::link::ProtocolParams;
use qkd_core::postproc::finite_key::{DEFAULT_EPS_QKD, SecurityParams};
use qkd_sim::{LinkParams, SourceBounds};
use qkd_tls::TlsFiles;

/// Errors loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file or environment does not parse into the expected structure.
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: PathBuf,
        /// What is wrong (names the key).
        message: String,
    },
    /// A value is out of range.
    #[error("{file}: {message}")]
    Invalid {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The physical link model: a preset or a preset file, with optional overrides.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSection {
    /// Name of a built-in preset (`qkdctl simulate --help` lists them). Default `lab-10km`.
    pub preset: Option<String>,
    /// A preset file (TOML, the format of `presets/*.toml`); takes precedence over `preset`.
    pub file: Option<PathBuf>,
    /// Fibre length override, km.
    pub distance_km: Option<f64>,
}

impl LinkSection {
    /// Resolves the physical parameters and the source calibration the preset file ships (its
    /// `[security]` table), if any.
    pub fn resolve_with_bounds(&self, base_dir: &Path) -> Result<(LinkParams, Option<SourceBounds>), String> {
        let (mut params, bounds) = match (&self.file, &self.preset) {
            (Some(file), _) => {
                let path = base_dir.join(file);
                let text = std::fs::read_to_string(&path).map_err(|e| format!("link.file {}: {e}", path.display()))?;
                LinkParams::with_bounds_from_toml_str(&text)
                    .map_err(|e| format!("link.file {}: {e}", path.display()))?
            }
            (None, Some(name)) => LinkParams::preset_with_bounds(name).map_err(|e| format!("link.preset: {e}"))?,
            (None, None) => LinkParams::preset_with_bounds("lab-10km").map_err(|e| format!("link.preset: {e}"))?,
        };
        if let Some(km) = self.distance_km {
            params.distance_km = km;
        }
        params.validate().map_err(|e| format!("link: {e}"))?;
        Ok((params, bounds))
    }
}

fn default_eps_qkd() -> f64 {
    DEFAULT_EPS_QKD
}

/// What the finite-key analysis assumes: the overall security parameter and the source's
/// calibrated upper bounds. Must be equal at both ends (the session digest covers it).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySection {
    /// Overall security parameter eps_QKD = eps_cor + eps_sec of every block's key
    /// (dimensionless, default 1e-9); the code splits it between correctness, the statistical
    /// bounds and privacy amplification (docs/security.md).
    #[serde(default = "default_eps_qkd")]
    pub eps_qkd: f64,
    /// Upper bound on the source's mean photon number per pulse leaving Alice's lab, from its
    /// calibration (dimensionless). When absent, the link preset's `[security]` table gives it.
    #[serde(default)]
    pub mu_max: Option<f64>,
    /// Upper bound on the source's g2(0), from its calibration (dimensionless). When absent, the
    /// link preset's `[security]` table gives it.
    #[serde(default)]
    pub g2_max: Option<f64>,
}

impl Default for SecuritySection {
    fn default() -> Self {
        Self { eps_qkd: DEFAULT_EPS_QKD, mu_max: None, g2_max: None }
    }
}

impl SecuritySection {
    /// Fills the bounds left unset from the preset's calibration, then checks them.
    pub fn complete(&mut self, preset: Option<SourceBounds>) -> Result<(), String> {
        if let Some(bounds) = preset {
            self.mu_max.get_or_insert(bounds.mu_max);
            self.g2_max.get_or_insert(bounds.g2_max);
        }
        if !(self.eps_qkd > 0.0 && self.eps_qkd < 1.0) {
            return Err(format!("security.eps_qkd = {} is not in (0, 1)", self.eps_qkd));
        }
        for (name, value) in [("mu_max", self.mu_max), ("g2_max", self.g2_max)] {
            match value {
                None => {
                    return Err(format!(
                        "security.{name} is not set and the link preset has no calibration: set it from the \
                         source's calibration (an upper bound)"
                    ));
                }
                Some(v) if !(v.is_finite() && v >= 0.0) => {
                    return Err(format!("security.{name} = {v} is not a finite, non-negative number"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The parameters of the key length: these bounds and eps_QKD, with Alice's basis probability
    /// `p_z`. Fails when a bound is unset (see [`SecuritySection::complete`]).
    pub fn params(&self, p_z: f64) -> Result<SecurityParams, String> {
        match (self.mu_max, self.g2_max) {
            (Some(mu_max), Some(g2_max)) => Ok(SecurityParams { eps_qkd: self.eps_qkd, p_z, mu_max, g2_max }),
            _ => Err("security.mu_max and security.g2_max must be set".into()),
        }
    }
}

/// Which driver gives the daemon its quantum channel (`[device]`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceDriver {
    /// The in-process simulator: photons over the simulated fibre (`[fibre]`).
    #[default]
    Sim,
    /// A device process serving the device API (`proto/device.proto`): a vendor driver, or
    /// `qkdctl device emulate`.
    Grpc,
    /// A recording made by `qkdctl device record` (or `qkdctl device emulate --record`).
    Replay,
}

/// The quantum device: where the daemon's frames (Alice) or detections (Bob) come from.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// `sim` (default), `grpc` or `replay`.
    #[serde(default)]
    pub driver: DeviceDriver,
    /// `grpc`: the device process, `HOST:PORT` or `unix:PATH`.
    #[serde(default)]
    pub address: Option<String>,
    /// `replay`: the recording.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

impl DeviceSection {
    /// Checks that the driver has what it needs.
    fn validate(&self) -> Result<(), String> {
        match self.driver {
            DeviceDriver::Sim => Ok(()),
            DeviceDriver::Grpc => match &self.address {
                None => Err("device.driver = \"grpc\" needs device.address (HOST:PORT or unix:PATH)".into()),
                Some(a) => {
                    qkd_device::grpc::DeviceAddress::parse(a).map(|_| ()).map_err(|e| format!("device.address: {e}"))
                }
            },
            DeviceDriver::Replay if self.file.is_none() => {
                Err("device.driver = \"replay\" needs device.file (a recording)".into())
            }
            DeviceDriver::Replay => Ok(()),
        }
    }
}

fn default_alice_fibre() -> AliceFibre {
    AliceFibre { listen: SocketAddr::from(([127, 0, 0, 1], 7001)) }
}

fn default_bob_fibre() -> BobFibre {
    BobFibre { alice_addr: "127.0.0.1:7001".into() }
}

/// The key store's `[store]` section: where the key-encryption key (KEK) comes from. The KEK
/// seals every key at rest (docs/store.md, "Key custody"); it is never kept in the store.
/// Exactly one of the two keys.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    /// A file of 32 random bytes, mode 0600 (`qkdctl store kek --out FILE` makes one).
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// The name of a systemd credential holding the KEK (`LoadCredentialEncrypted=NAME:...` in
    /// the unit): read from `$CREDENTIALS_DIRECTORY/NAME`.
    #[serde(default)]
    pub kek_credential: Option<String>,
}

impl StoreSection {
    fn validate(&self) -> Result<(), String> {
        match (&self.kek_file, &self.kek_credential) {
            (Some(_), Some(_)) => Err("store: set kek_file or kek_credential, not both".into()),
            (None, None) => Err("store: no key-encryption key: set [store] kek_file (make one with `qkdctl store kek \
                                 --out FILE`) or kek_credential (a systemd credential)"
                .into()),
            (None, Some(name)) if name.is_empty() || name.contains('/') => {
                Err(format!("store.kek_credential = {name:?} is not a credential name"))
            }
            _ => Ok(()),
        }
    }

    /// Reads the KEK from the configured file or credential; the error names it.
    pub fn load_kek(&self) -> Result<qkd_store::Kek, qkd_store::KekFault> {
        match (&self.kek_file, &self.kek_credential) {
            (_, Some(name)) => qkd_store::Kek::from_credential(name),
            (Some(path), None) => qkd_store::Kek::from_file(path),
            (None, None) => Err(qkd_store::KekFault::Unreadable {
                source_name: "(none configured: set [store] kek_file or kek_credential)".into(),
                error: std::io::Error::from(std::io::ErrorKind::NotFound),
            }),
        }
    }
}

/// Alice's daemon configuration.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliceConfig {
    /// This node's name, in logs and in the session handshake.
    pub node_id: String,
    /// Directory of the key store and the status file; created if missing.
    pub data_dir: PathBuf,
    /// The key store's key-encryption key.
    pub store: StoreSection,
    /// Plain-HTTP liveness/readiness endpoint (`/healthz`, `/readyz`), for container health
    /// checks and load balancers; no client certificate, reveals nothing about keys. Off when
    /// absent.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// The classical channel's gRPC server.
    pub classical: AliceClassical,
    /// The quantum device (default: the in-process simulator).
    #[serde(default)]
    pub device: DeviceSection,
    /// The simulated fibre's transmitter (`device.driver = "sim"` only). Default: listens on
    /// 127.0.0.1:7001, since the simulated fibre carries Alice's states in clear.
    #[serde(default = "default_alice_fibre")]
    pub fibre: AliceFibre,
    /// TLS material for the classical channel.
    pub tls: TlsFiles,
    /// Physical link model.
    #[serde(default)]
    pub link: LinkSection,
    /// Post-processing parameters; must equal Bob's.
    #[serde(default)]
    pub protocol: ProtocolParams,
    /// Security parameter and calibrated source bounds; must equal Bob's.
    #[serde(default)]
    pub security: SecuritySection,
    /// The key management entity: ETSI GS QKD 014 key delivery to applications and the
    /// KME-to-KME channel. Off when absent.
    #[serde(default)]
    pub kme: Option<qkd_kme::KmeConfig>,
}

/// Alice's classical-channel server.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliceClassical {
    /// Address the gRPC server listens on (mutual TLS).
    pub listen: SocketAddr,
    /// DNS name that Bob's client certificate must carry (a SAN).
    pub peer_name: String,
}

/// Alice's end of the fibre.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliceFibre {
    /// Address where Bob's receiver (or an eavesdropper in between) connects.
    pub listen: SocketAddr,
}

/// Default of [`BobConfig::max_stored_units`]: 200 000 units of 256 bits (51 Mbit of key, about
/// 60 MB of the store's memory).
pub const DEFAULT_MAX_STORED_UNITS: u64 = 200_000;

fn default_max_stored_units() -> u64 {
    DEFAULT_MAX_STORED_UNITS
}

/// Bob's daemon configuration.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BobConfig {
    /// This node's name, in logs and in the session handshake.
    pub node_id: String,
    /// Directory of the key store and the status file; created if missing.
    pub data_dir: PathBuf,
    /// The key store's key-encryption key.
    pub store: StoreSection,
    /// Most key units the store may hold, ready or pending (0: no limit); while it is full, new
    /// blocks are aborted and no key is distilled (see `BobLink::set_max_stored_units`).
    #[serde(default = "default_max_stored_units")]
    pub max_stored_units: u64,
    /// Plain-HTTP liveness/readiness endpoint (`/healthz`, `/readyz`), for container health
    /// checks and load balancers; no client certificate, reveals nothing about keys. Off when
    /// absent.
    #[serde(default)]
    pub health_listen: Option<SocketAddr>,
    /// The classical channel's gRPC client.
    pub classical: BobClassical,
    /// The quantum device (default: the in-process simulator).
    #[serde(default)]
    pub device: DeviceSection,
    /// The simulated fibre's receiving end (`device.driver = "sim"` only). Default:
    /// 127.0.0.1:7001.
    #[serde(default = "default_bob_fibre")]
    pub fibre: BobFibre,
    /// TLS material for the classical channel.
    pub tls: TlsFiles,
    /// Physical link model.
    #[serde(default)]
    pub link: LinkSection,
    /// Post-processing parameters; must equal Alice's.
    #[serde(default)]
    pub protocol: ProtocolParams,
    /// Security parameter and calibrated source bounds; must equal Alice's.
    #[serde(default)]
    pub security: SecuritySection,
    /// The key management entity: ETSI GS QKD 014 key delivery to applications and the
    /// KME-to-KME channel. Off when absent.
    #[serde(default)]
    pub kme: Option<qkd_kme::KmeConfig>,
}

/// Bob's classical-channel client.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BobClassical {
    /// Alice's gRPC address, `host:port`.
    pub alice_addr: String,
    /// DNS name that Alice's server certificate must carry (a SAN).
    pub alice_name: String,
    /// Longest wait between reconnection attempts, seconds (the back-off doubles up to it, and
    /// starts over after a committed block).
    #[serde(default = "default_max_backoff_s")]
    pub max_backoff_s: f64,
    /// How fast a dead peer or a cut network is noticed, seconds: an HTTP/2 ping when the channel
    /// has been silent this long, and the channel is given up when the ping is not answered
    /// within as long again. Default 1 (so a partition is noticed within about 2 s).
    #[serde(default = "default_keepalive_s")]
    pub keepalive_s: f64,
}

fn default_max_backoff_s() -> f64 {
    5.0
}

fn default_keepalive_s() -> f64 {
    1.0
}

/// Bob's end of the fibre.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BobFibre {
    /// Address of Alice's fibre transmitter (or of an eavesdropper in between), `host:port`.
    pub alice_addr: String,
}

/// Loads a configuration file with environment overrides (`PREFIX__SECTION__KEY=value`),
/// resolving relative paths against the file's directory.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path, env_prefix: &str) -> Result<T, ConfigError> {
    let parse = |e: config::ConfigError| ConfigError::Parse { file: path.to_owned(), message: e.to_string() };
    let settings = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(config::Environment::with_prefix(env_prefix).prefix_separator("__").separator("__"))
        .build()
        .map_err(parse)?;
    settings.try_deserialize().map_err(parse)
}

impl AliceConfig {
    /// Loads and validates `path`.
    pub fn load(path: &Path) -> Result<(Self, LinkParams), ConfigError> {
        let mut cfg: Self = load(path, "ALICE")?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.rebase(base);
        cfg.device.validate().map_err(|message| ConfigError::Invalid { file: path.to_owned(), message })?;
        cfg.store.validate().map_err(|message| ConfigError::Invalid { file: path.to_owned(), message })?;
        let link = validate(path, &cfg.link, &cfg.protocol, &mut cfg.security, cfg.kme.as_ref(), base)?;
        Ok((cfg, link))
    }

    fn rebase(&mut self, base: &Path) {
        rebase_path(&mut self.data_dir, base);
        rebase_store(&mut self.store, base);
        rebase_tls(&mut self.tls, base);
        rebase_kme(&mut self.kme, base);
        rebase_device(&mut self.device, base);
    }
}

impl BobConfig {
    /// Loads and validates `path`.
    pub fn load(path: &Path) -> Result<(Self, LinkParams), ConfigError> {
        let mut cfg: Self = load(path, "BOB")?;
        let base = path.parent().unwrap_or(Path::new("."));
        rebase_path(&mut cfg.data_dir, base);
        rebase_store(&mut cfg.store, base);
        rebase_tls(&mut cfg.tls, base);
        rebase_kme(&mut cfg.kme, base);
        rebase_device(&mut cfg.device, base);
        cfg.device.validate().map_err(|message| ConfigError::Invalid { file: path.to_owned(), message })?;
        cfg.store.validate().map_err(|message| ConfigError::Invalid { file: path.to_owned(), message })?;
        if !(cfg.classical.keepalive_s.is_finite() && cfg.classical.keepalive_s >= 0.1) {
            return Err(ConfigError::Invalid {
                file: path.to_owned(),
                message: format!("classical.keepalive_s = {} must be at least 0.1", cfg.classical.keepalive_s),
            });
        }
        if cfg.classical.max_backoff_s.is_nan() || cfg.classical.max_backoff_s <= 0.0 {
            return Err(ConfigError::Invalid {
                file: path.to_owned(),
                message: "classical.max_backoff_s must be positive".into(),
            });
        }
        let link = validate(path, &cfg.link, &cfg.protocol, &mut cfg.security, cfg.kme.as_ref(), base)?;
        Ok((cfg, link))
    }
}

fn validate(
    path: &Path,
    link: &LinkSection,
    protocol: &ProtocolParams,
    security: &mut SecuritySection,
    kme: Option<&qkd_kme::KmeConfig>,
    base: &Path,
) -> Result<LinkParams, ConfigError> {
    let invalid = |message| ConfigError::Invalid { file: path.to_owned(), message };
    protocol.validate().map_err(|m| invalid(format!("protocol.{m}")))?;
    check_unit_size(protocol, kme).map_err(invalid)?;
    let (link, bounds) = link.resolve_with_bounds(base).map_err(invalid)?;
    security.complete(bounds).map_err(invalid)?;
    Ok(link)
}

/// The key delivery serves keys made of whole stored units of [`qkd_store::kme::UNIT_BYTES`]
/// bytes, so with a `[kme]` section the link must cut its keys into units of that size.
fn check_unit_size(protocol: &ProtocolParams, kme: Option<&qkd_kme::KmeConfig>) -> Result<(), String> {
    let kme_bits = 8 * qkd_store::kme::UNIT_BYTES as u32;
    match kme {
        Some(_) if protocol.key_unit_bits != kme_bits => Err(format!(
            "protocol.key_unit_bits = {} but the key delivery ([kme]) serves {kme_bits}-bit units; \
             set key_unit_bits = {kme_bits} or remove the [kme] section",
            protocol.key_unit_bits
        )),
        _ => Ok(()),
    }
}

fn rebase_path(path: &mut PathBuf, base: &Path) {
    if path.is_relative() {
        *path = base.join(&*path);
    }
}

fn rebase_store(store: &mut StoreSection, base: &Path) {
    if let Some(file) = &mut store.kek_file {
        rebase_path(file, base);
    }
}

fn rebase_device(device: &mut DeviceSection, base: &Path) {
    if let Some(file) = &mut device.file {
        rebase_path(file, base);
    }
}

fn rebase_kme(kme: &mut Option<qkd_kme::KmeConfig>, base: &Path) {
    if let Some(kme) = kme {
        rebase_tls(&mut kme.tls, base);
    }
}

fn rebase_tls(tls: &mut TlsFiles, base: &Path) {
    tls.rebase(base);
}
