//! [`CacheConfig`]: the builder's settings as data, for configuration files (any serde format:
//! TOML, YAML, JSON) or environment variables.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use serde::{Deserialize, Deserializer};

use crate::error::{Error, Result};
use crate::options::EntryOptions;
use crate::{TieredCacheBuilder, builder::DEFAULT_TTL};

/// A cache's configuration. Every field but `namespace` and `redis_url` (or
/// `redis_cluster`) is optional (the
/// builder's defaults apply). Durations are written as humantime strings: `"250ms"`, `"30s"`,
/// `"5m"`, `"1h 30m"`. Unknown fields are refused, so a typo is an error, not a silent default.
///
/// ```
/// let config: tiered::CacheConfig = serde_json::from_str(r#"{
///     "namespace": "users",
///     "redis_url": "redis://127.0.0.1:6379",
///     "ttl": "5m",
///     "stale_while_revalidate": "1m",
///     "l1_max_bytes": 67108864
/// }"#).unwrap();
/// assert_eq!(config.ttl, Some(std::time::Duration::from_secs(300)));
/// ```
#[derive(Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct CacheConfig {
    /// See [`TieredCacheBuilder::namespace`]. Required.
    pub namespace: String,
    /// See [`TieredCacheBuilder::redis_url`]. Required unless `redis_cluster` is given.
    pub redis_url: String,
    /// A Redis Cluster's seed node URLs, comma-separated
    /// ([`TieredCacheBuilder::redis_cluster`]); instead of `redis_url`.
    pub redis_cluster: Option<String>,
    /// A PEM file with the CA that signed the servers' TLS certificates
    /// ([`TieredCacheBuilder::tls_root_certificate`]), for `rediss://` URLs.
    pub redis_ca_file: Option<String>,
    /// See [`TieredCacheBuilder::schema_version`].
    pub schema_version: Option<u32>,
    /// See [`TieredCacheBuilder::l1_max_bytes`].
    pub l1_max_bytes: Option<u64>,
    /// See [`TieredCacheBuilder::l1_max_entries`].
    pub l1_max_entries: Option<u64>,
    /// See [`TieredCacheBuilder::max_value_bytes`].
    pub max_value_bytes: Option<usize>,
    /// See [`TieredCacheBuilder::l2_timeout`].
    #[serde(deserialize_with = "duration")]
    pub l2_timeout: Option<Duration>,
    /// See [`TieredCacheBuilder::lock_time_to_live`].
    #[serde(deserialize_with = "duration")]
    pub lock_ttl: Option<Duration>,
    /// See [`TieredCacheBuilder::max_load_time`].
    #[serde(deserialize_with = "duration")]
    pub max_load_time: Option<Duration>,
    /// Failures before the circuit breaker opens ([`TieredCacheBuilder::circuit_breaker`]).
    pub breaker_failures: Option<u32>,
    /// How long the breaker stays open.
    #[serde(deserialize_with = "duration")]
    pub breaker_cooldown: Option<Duration>,
    /// The bus heartbeat period P ([`invalidation::BusConfig::heartbeat`]).
    #[serde(deserialize_with = "duration")]
    pub heartbeat: Option<Duration>,
    /// The bus heartbeat timeout T ([`invalidation::BusConfig::heartbeat_timeout`]).
    #[serde(deserialize_with = "duration")]
    pub heartbeat_timeout: Option<Duration>,
    /// The shared secret that signs the bus's messages ([`invalidation::BusConfig::secret`]);
    /// every node of the namespace needs the same one. Never printed.
    pub bus_secret: Option<String>,
    /// See [`TieredCacheBuilder::max_key_len`].
    pub max_key_len: Option<usize>,
    /// See [`TieredCacheBuilder::hit_ratio_floor`].
    pub hit_ratio_floor: Option<f64>,
    /// See [`TieredCacheBuilder::trace_keys`].
    pub trace_keys: Option<bool>,
    /// Default options: [`EntryOptions::time_to_live`].
    #[serde(deserialize_with = "duration")]
    pub ttl: Option<Duration>,
    /// Default options: [`EntryOptions::l1_time_to_live`].
    #[serde(deserialize_with = "duration")]
    pub l1_ttl: Option<Duration>,
    /// Default options: [`EntryOptions::stale_while_revalidate`].
    #[serde(deserialize_with = "duration")]
    pub stale_while_revalidate: Option<Duration>,
    /// Default options: [`EntryOptions::fail_safe`].
    #[serde(deserialize_with = "duration")]
    pub fail_safe: Option<Duration>,
    /// Default options: [`EntryOptions::fail_safe_throttle`].
    #[serde(deserialize_with = "duration")]
    pub fail_safe_throttle: Option<Duration>,
    /// Default options: [`EntryOptions::soft_timeout`].
    #[serde(deserialize_with = "duration")]
    pub soft_timeout: Option<Duration>,
    /// Default options: [`EntryOptions::hard_timeout`].
    #[serde(deserialize_with = "duration")]
    pub hard_timeout: Option<Duration>,
    /// Default options: [`EntryOptions::jitter`].
    #[serde(deserialize_with = "duration")]
    pub jitter: Option<Duration>,
    /// Default options: [`EntryOptions::negative_ttl`].
    #[serde(deserialize_with = "duration")]
    pub negative_ttl: Option<Duration>,
    /// Default options: [`EntryOptions::outage_staleness`] (`"0s"`: the strict mode).
    #[serde(deserialize_with = "duration")]
    pub outage_staleness: Option<Duration>,
}

impl fmt::Debug for CacheConfig {
    /// Every field, with the Redis URLs' passwords (and user names) hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheConfig")
            .field("namespace", &self.namespace)
            .field("redis_url", &redact(&self.redis_url))
            .field(
                "redis_cluster",
                &self
                    .redis_cluster
                    .as_deref()
                    .map(|seeds| seeds.split(',').map(redact).collect::<Vec<_>>()),
            )
            .field("redis_ca_file", &self.redis_ca_file)
            .field("schema_version", &self.schema_version)
            .field("l1_max_bytes", &self.l1_max_bytes)
            .field("l1_max_entries", &self.l1_max_entries)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("l2_timeout", &self.l2_timeout)
            .field("lock_ttl", &self.lock_ttl)
            .field("max_load_time", &self.max_load_time)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cooldown", &self.breaker_cooldown)
            .field("heartbeat", &self.heartbeat)
            .field("heartbeat_timeout", &self.heartbeat_timeout)
            .field("bus_secret", &self.bus_secret.as_ref().map(|_| "<hidden>"))
            .field("max_key_len", &self.max_key_len)
            .field("hit_ratio_floor", &self.hit_ratio_floor)
            .field("trace_keys", &self.trace_keys)
            .field("ttl", &self.ttl)
            .field("l1_ttl", &self.l1_ttl)
            .field("stale_while_revalidate", &self.stale_while_revalidate)
            .field("fail_safe", &self.fail_safe)
            .field("fail_safe_throttle", &self.fail_safe_throttle)
            .field("soft_timeout", &self.soft_timeout)
            .field("hard_timeout", &self.hard_timeout)
            .field("jitter", &self.jitter)
            .field("negative_ttl", &self.negative_ttl)
            .field("outage_staleness", &self.outage_staleness)
            .finish()
    }
}

/// A Redis URL without its credentials: `redis://***@host:port`.
fn redact(url: &str) -> String {
    let url = url.trim();
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Option<Duration>, D::Error> {
    struct Humantime;
    impl Visitor<'_> for Humantime {
        type Value = Option<Duration>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"250ms\", \"30s\" or \"5m\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Self::Value, E> {
            humantime::parse_duration(v)
                .map(Some)
                .map_err(|e| E::custom(format!("bad duration {v:?}: {e}")))
        }
    }
    d.deserialize_str(Humantime)
}

impl CacheConfig {
    /// Reads the configuration from environment variables named `{prefix}_{FIELD}` in upper
    /// case (`TIERED_NAMESPACE`, `TIERED_TTL=5m`, `TIERED_L1_MAX_BYTES=67108864`).
    ///
    /// # Errors
    /// [`Error::Config`] naming the variable that does not parse.
    pub fn from_env(prefix: &str) -> Result<CacheConfig> {
        Self::from_vars(prefix, std::env::vars())
    }

    /// As [`CacheConfig::from_env`], from the given variables (for tests, or a `.env` file
    /// already read).
    ///
    /// # Errors
    /// As [`CacheConfig::from_env`].
    pub fn from_vars(
        prefix: &str,
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<CacheConfig> {
        let head = format!("{}_", prefix.to_uppercase());
        let fields: HashMap<String, String> = vars
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(&head).map(|field| (field.to_lowercase(), v)))
            .collect();
        let deserializer = de::value::MapDeserializer::new(fields.into_iter().map(|(k, v)| {
            let var = format!("{head}{}", k.to_uppercase());
            (k, EnvValue(var, v))
        }));
        CacheConfig::deserialize(deserializer)
            .map_err(|e: de::value::Error| Error::Config(format!("environment ({head}*): {e}")))
    }

    /// A builder with these settings, for the rest to be added in code.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field that is missing or out of range.
    pub fn builder<V>(&self) -> Result<TieredCacheBuilder<V>>
    where
        V: serde::Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        if self.namespace.is_empty() {
            return Err(Error::Config("namespace: required".into()));
        }
        let mut b = crate::TieredCache::<V>::builder().namespace(&self.namespace);
        match (self.redis_url.is_empty(), &self.redis_cluster) {
            (true, None) => return Err(Error::Config("redis_url: required".into())),
            (false, Some(_)) => {
                return Err(Error::Config(
                    "redis_url and redis_cluster: give one, not both".into(),
                ));
            }
            (false, None) => b = b.redis_url(&self.redis_url),
            (true, Some(seeds)) => {
                b = b.redis_cluster(seeds.split(',').map(str::trim).filter(|s| !s.is_empty()));
            }
        }
        if let Some(path) = &self.redis_ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| Error::Config(format!("redis_ca_file: cannot read {path}: {e}")))?;
            b = b.tls_root_certificate(pem);
        }
        if let Some(v) = self.schema_version {
            b = b.schema_version(v);
        }
        if let Some(v) = self.l1_max_bytes {
            b = b.l1_max_bytes(v);
        }
        if let Some(v) = self.l1_max_entries {
            b = b.l1_max_entries(v);
        }
        if let Some(v) = self.max_value_bytes {
            b = b.max_value_bytes(v);
        }
        if let Some(v) = self.l2_timeout {
            b = b.l2_timeout(v);
        }
        if let Some(v) = self.lock_ttl {
            b = b.lock_time_to_live(v);
        }
        if let Some(v) = self.max_load_time {
            b = b.max_load_time(v);
        }
        if self.breaker_failures.is_some() || self.breaker_cooldown.is_some() {
            b = b.circuit_breaker(
                self.breaker_failures.unwrap_or(5),
                self.breaker_cooldown.unwrap_or(Duration::from_secs(1)),
            );
        }
        let mut bus = invalidation::BusConfig::default();
        if let Some(v) = self.heartbeat {
            bus = bus.heartbeat(v);
        }
        if let Some(v) = self.heartbeat_timeout {
            bus = bus.heartbeat_timeout(v);
        }
        if let Some(secret) = &self.bus_secret {
            if secret.is_empty() {
                return Err(Error::Config("bus_secret: empty".into()));
            }
            bus = bus.secret(secret);
        }
        if let Some(v) = self.max_key_len {
            b = b.max_key_len(v);
        }
        b = b.bus_config(bus);
        if let Some(v) = self.hit_ratio_floor {
            b = b.hit_ratio_floor(v);
        }
        if let Some(v) = self.trace_keys {
            b = b.trace_keys(v);
        }
        Ok(b.default_options(self.options()))
    }

    /// The default entry options these settings give.
    pub fn options(&self) -> EntryOptions {
        let mut o = EntryOptions::new(self.ttl.unwrap_or(DEFAULT_TTL));
        if let Some(v) = self.l1_ttl {
            o = o.l1_time_to_live(v);
        }
        if let Some(v) = self.stale_while_revalidate {
            o = o.stale_while_revalidate(v);
        }
        if let Some(v) = self.fail_safe {
            o = o.fail_safe(v);
        }
        if let Some(v) = self.fail_safe_throttle {
            o = o.fail_safe_throttle(v);
        }
        if let Some(v) = self.soft_timeout {
            o = o.soft_timeout(v);
        }
        if let Some(v) = self.hard_timeout {
            o = o.hard_timeout(v);
        }
        if let Some(v) = self.jitter {
            o = o.jitter(v);
        }
        if let Some(v) = self.outage_staleness {
            o = o.outage_staleness(v);
        }
        if let Some(v) = self.negative_ttl {
            o = o.negative_ttl(v);
        }
        o
    }
}

/// An environment variable (its name, for errors, and its text), parsed as whatever the
/// field asks for.
struct EnvValue(String, String);

impl<'de> IntoDeserializer<'de, de::value::Error> for EnvValue {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

macro_rules! parse_as {
    ($($method:ident => $visit:ident: $ty:ty),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> std::result::Result<V::Value, Self::Error> {
            let v: $ty = self.1.trim().parse().map_err(|_| {
                de::Error::custom(format!("{}: {:?} is not a {}", self.0, self.1, stringify!($ty)))
            })?;
            visitor.$visit(v)
        }
    )*};
}

impl<'de> Deserializer<'de> for EnvValue {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(
        self,
        visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        let var = self.0;
        visitor
            .visit_string(self.1)
            .map_err(|e: Self::Error| de::Error::custom(format!("{var}: {e}")))
    }

    fn deserialize_option<V: Visitor<'de>>(
        self,
        visitor: V,
    ) -> std::result::Result<V::Value, Self::Error> {
        visitor.visit_some(self)
    }

    parse_as! {
        deserialize_bool => visit_bool: bool,
        deserialize_u8 => visit_u8: u8,
        deserialize_u16 => visit_u16: u16,
        deserialize_u32 => visit_u32: u32,
        deserialize_u64 => visit_u64: u64,
        deserialize_i64 => visit_i64: i64,
        deserialize_f64 => visit_f64: f64,
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i128 u128 f32 char str string bytes byte_buf unit unit_struct
        newtype_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn reads_the_environment() {
        let c = CacheConfig::from_vars(
            "tiered",
            vars(&[
                ("TIERED_NAMESPACE", "users"),
                ("TIERED_REDIS_URL", "redis://127.0.0.1:6379"),
                ("TIERED_TTL", "5m"),
                ("TIERED_L1_MAX_BYTES", "1048576"),
                ("TIERED_TRACE_KEYS", "true"),
                ("TIERED_HIT_RATIO_FLOOR", "0.9"),
                ("TIERED_OUTAGE_STALENESS", "0s"),
                ("TIERED_BUS_SECRET", "s3cret"),
                ("TIERED_MAX_KEY_LEN", "1024"),
                ("OTHER_TTL", "1s"),
            ]),
        )
        .unwrap();
        assert_eq!(c.outage_staleness, Some(Duration::ZERO));
        assert_eq!(
            c.options().outage_staleness,
            Duration::ZERO,
            "the strict mode"
        );
        assert_eq!(c.bus_secret.as_deref(), Some("s3cret"));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the secret is never printed"
        );
        assert_eq!(c.max_key_len, Some(1024));
        assert_eq!(c.namespace, "users");
        assert_eq!(c.ttl, Some(Duration::from_secs(300)));
        assert_eq!(c.l1_max_bytes, Some(1 << 20));
        assert_eq!(c.trace_keys, Some(true));
        assert_eq!(c.hit_ratio_floor, Some(0.9));
        assert_eq!(c.options().l2_time_to_live(), Duration::from_secs(300));
    }

    #[test]
    fn errors_name_the_field() {
        let e = CacheConfig::from_vars("t", vars(&[("T_TTL", "soon")])).unwrap_err();
        assert!(
            e.to_string().contains("T_TTL") && e.to_string().contains("soon"),
            "{e}"
        );
        let e = CacheConfig::from_vars("t", vars(&[("T_L1_MAX_BYTES", "lots")])).unwrap_err();
        assert!(e.to_string().contains("T_L1_MAX_BYTES"), "{e}");
        let e = CacheConfig::from_vars("t", vars(&[("T_TTLL", "5s")])).unwrap_err();
        assert!(
            e.to_string().contains("ttll"),
            "an unknown field is refused: {e}"
        );
        let e = CacheConfig::default().builder::<String>().unwrap_err();
        assert!(e.to_string().contains("namespace"), "{e}");
        let e = serde_json::from_str::<CacheConfig>(r#"{"namespace": "x", "ttl": 5}"#).unwrap_err();
        assert!(e.to_string().contains("duration"), "{e}");
    }

    #[test]
    fn a_file_gives_the_same_as_the_builder() {
        let c: CacheConfig = serde_json::from_str(
            r#"{"namespace": "users", "redis_url": "redis://x", "ttl": "30s",
                "stale_while_revalidate": "10s", "fail_safe": "1h", "soft_timeout": "100ms"}"#,
        )
        .unwrap();
        let expected = EntryOptions::new(Duration::from_secs(30))
            .stale_while_revalidate(Duration::from_secs(10))
            .fail_safe(Duration::from_secs(3600))
            .soft_timeout(Duration::from_millis(100));
        assert_eq!(c.options(), expected);
        assert!(c.builder::<String>().is_ok());
    }

    #[test]
    fn debug_output_hides_redis_passwords() {
        let config: CacheConfig = serde_json::from_str(
            r#"{"namespace": "users", "redis_url": "redis://app:pw-in-url@10.0.0.1:6379",
                "redis_cluster": "rediss://app:pw2@a:1, rediss://b:2"}"#,
        )
        .unwrap();
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("pw-in-url") && !shown.contains("pw2"),
            "{shown}"
        );
        assert!(shown.contains("redis://***@10.0.0.1:6379"), "{shown}");
        assert!(shown.contains("rediss://b:2"), "{shown}");
    }
}
