//! RabbitMQ definitions (the JSON `rabbitmqctl import_definitions` and the
//! `load_definitions` setting read) for the relay's topology, so a broker booted from
//! `rabbitmq/definitions.json` shows every queue before the first event arrives.
//!
//! Built from [`Topology::queues`], the same description `declare` uses, so what the
//! broker imports and what the relay declares cannot disagree.

use std::str::FromStr;

use base64::Engine;
use lapin::uri::AMQPUri;
use serde::Serialize;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::topology::{ArgValue, Topology};

/// The hashing scheme RabbitMQ uses by default since 3.6: `base64(salt ++ sha256(salt ++ password))`.
pub const HASHING_ALGORITHM: &str = "rabbit_password_hashing_sha256";

/// Why definitions could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionsError {
    /// The broker URL does not parse; fix `AMQP_URL`.
    #[error("AMQP_URL is not a valid AMQP URL: {0}")]
    AmqpUrl(String),
    /// The management login is not `user:pass`, or is the relay's own user (which
    /// would then get administrator rights); choose another name.
    #[error("management login: {0}")]
    ManagementLogin(String),
}

/// A login for people (the management UI), added next to the relay's own user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagementLogin {
    /// Login name.
    pub user: String,
    /// Its password (hashed in the export, never written out).
    pub password: String,
}

impl std::str::FromStr for ManagementLogin {
    type Err = DefinitionsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((user, password)) if !user.is_empty() => Ok(Self {
                user: user.to_owned(),
                password: password.to_owned(),
            }),
            _ => Err(DefinitionsError::ManagementLogin(
                "expected user:pass".into(),
            )),
        }
    }
}

/// A full definitions document: the login the relay uses, its vhost, and the topology.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Definitions {
    /// The relay's broker user, and the management login when one is asked for. On a
    /// blank node that imports definitions the broker does not create its default
    /// user, so without these entries nobody could log in.
    pub users: Vec<User>,
    /// The vhost of `AMQP_URL`.
    pub vhosts: Vec<Vhost>,
    /// The relay's rights: only its own names (plus publishing to the default
    /// exchange); the management login's: everything on the vhost.
    pub permissions: Vec<Permission>,
    /// The work exchange.
    pub exchanges: Vec<Exchange>,
    /// Work, every retry level and the DLQ, with their declaration arguments.
    pub queues: Vec<Queue>,
    /// Work exchange to work queue.
    pub bindings: Vec<Binding>,
}

/// A broker user.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct User {
    /// Login name.
    pub name: String,
    /// Salted hash of the password, never the password itself.
    pub password_hash: String,
    /// How `password_hash` was made.
    pub hashing_algorithm: &'static str,
    /// None for the relay (it needs no management access); `administrator` for the
    /// management login.
    pub tags: Vec<&'static str>,
}

/// A virtual host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Vhost {
    /// Its name (`/` by default).
    pub name: String,
}

/// A user's rights on a vhost (regular expressions over resource names).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Permission {
    /// The user.
    pub user: String,
    /// The vhost.
    pub vhost: String,
    /// Resources the user may declare and delete.
    pub configure: String,
    /// Resources the user may publish to.
    pub write: String,
    /// Resources the user may consume from.
    pub read: String,
}

/// What the relay needs on a vhost, and nothing more: declare, delete, consume from and
/// publish to the names under its prefix. Writing also covers the default exchange
/// (`amq.default` to the broker's permission checks): retries and the DLQ are
/// published there, and RabbitMQ checks the same right when a queue is declared with
/// it as its dead-letter exchange.
pub fn relay_permission(user: &str, vhost: &str, prefix: &str) -> Permission {
    let own = format!("^{}\\.", regex_escape(prefix));
    Permission {
        user: user.to_owned(),
        vhost: vhost.to_owned(),
        configure: own.clone(),
        write: format!("^({}\\..*|amq\\.default)$", regex_escape(prefix)),
        read: own,
    }
}

/// `s` with every regular-expression metacharacter escaped, so a prefix such as
/// `acme.prod` matches itself only (not `acmexprod`).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$-#&~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// An exchange.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Exchange {
    /// Exchange name.
    pub name: String,
    /// Its vhost.
    pub vhost: String,
    /// Exchange type; `direct`, as `Topology::declare` declares it.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Survives a broker restart.
    pub durable: bool,
    /// Never deleted when unbound.
    pub auto_delete: bool,
    /// Clients may publish to it.
    pub internal: bool,
    /// No arguments.
    pub arguments: Map<String, Value>,
}

/// A queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Queue {
    /// Queue name.
    pub name: String,
    /// Its vhost.
    pub vhost: String,
    /// Quorum queues are always durable.
    pub durable: bool,
    /// Never deleted when its last consumer leaves.
    pub auto_delete: bool,
    /// Exactly the arguments the relay declares it with; any difference would make the
    /// relay's own declaration fail with `PRECONDITION_FAILED`.
    pub arguments: Map<String, Value>,
}

/// A binding of an exchange to a queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Binding {
    /// The exchange.
    pub source: String,
    /// Its vhost.
    pub vhost: String,
    /// The queue.
    pub destination: String,
    /// Always `queue`.
    pub destination_type: &'static str,
    /// The routing key the relay publishes with.
    pub routing_key: String,
    /// No arguments.
    pub arguments: Map<String, Value>,
}

impl Definitions {
    /// Definitions for `topology` on the broker, user and vhost named by `amqp_url`,
    /// with a `management` login for people when given.
    pub fn new(
        topology: &Topology,
        amqp_url: &str,
        management: Option<&ManagementLogin>,
    ) -> Result<Self, DefinitionsError> {
        let uri = AMQPUri::from_str(amqp_url).map_err(DefinitionsError::AmqpUrl)?;
        let user = uri.authority.userinfo.username;
        let password = uri.authority.userinfo.password;
        let vhost = uri.vhost;
        if management.is_some_and(|m| m.user == user) {
            return Err(DefinitionsError::ManagementLogin(format!(
                "{user:?} is the relay's own user (AMQP_URL); the UI login must be another"
            )));
        }
        let queues = topology
            .queues()
            .into_iter()
            .map(|q| Queue {
                arguments: q
                    .args
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), json_value(v)))
                    .collect(),
                name: q.name,
                vhost: vhost.clone(),
                durable: true,
                auto_delete: false,
            })
            .collect();
        let mut users = vec![User {
            password_hash: password_hash(&user, &password),
            hashing_algorithm: HASHING_ALGORITHM,
            tags: vec![],
            name: user.clone(),
        }];
        let mut permissions = vec![relay_permission(&user, &vhost, topology.prefix())];
        if let Some(m) = management {
            users.push(User {
                name: m.user.clone(),
                password_hash: password_hash(&m.user, &m.password),
                hashing_algorithm: HASHING_ALGORITHM,
                tags: vec!["administrator"],
            });
            permissions.push(Permission {
                user: m.user.clone(),
                vhost: vhost.clone(),
                configure: ".*".into(),
                write: ".*".into(),
                read: ".*".into(),
            });
        }
        Ok(Self {
            users,
            vhosts: vec![Vhost {
                name: vhost.clone(),
            }],
            permissions,
            exchanges: vec![Exchange {
                name: topology.work.clone(),
                vhost: vhost.clone(),
                kind: "direct",
                durable: true,
                auto_delete: false,
                internal: false,
                arguments: Map::new(),
            }],
            queues,
            bindings: vec![Binding {
                source: topology.work.clone(),
                vhost,
                destination: topology.work.clone(),
                destination_type: "queue",
                routing_key: topology.work.clone(),
                arguments: Map::new(),
            }],
        })
    }

    /// The document as `topology export` prints it: pretty JSON ending in a newline.
    pub fn to_pretty_json(&self) -> String {
        let mut out = serde_json::to_string_pretty(self).expect("definitions always serialise");
        out.push('\n');
        out
    }
}

fn json_value(v: &ArgValue) -> Value {
    match v {
        ArgValue::Str(s) => Value::String(s.clone()),
        ArgValue::Int(i) => Value::from(*i),
    }
}

/// RabbitMQ's `rabbit_password_hashing_sha256` hash of `password`.
///
/// The 4-byte salt is derived from the user name instead of drawn at random, so the
/// export is reproducible and the checked-in file can be compared with it. These
/// definitions carry a development login (guest/guest in compose); a production
/// broker should get its users from its own secret store.
pub fn password_hash(user: &str, password: &str) -> String {
    let seed = Sha256::digest(format!("webhook-relay definitions salt for {user}"));
    let salt = &seed[..4];
    let mut salted = Sha256::new();
    salted.update(salt);
    salted.update(password.as_bytes());
    let mut stored = salt.to_vec();
    stored.extend_from_slice(&salted.finalize());
    base64::engine::general_purpose::STANDARD.encode(stored)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::broker::topology::DLQ_DELIVERY_LIMIT;
    use crate::retry::Ladder;

    fn default_topology() -> Topology {
        Topology::new(
            "webhooks",
            &Ladder::new(Duration::from_secs(1), Duration::from_secs(3600)),
        )
    }

    #[test]
    fn password_hash_is_what_rabbitmq_checks() {
        let stored = base64::engine::general_purpose::STANDARD
            .decode(password_hash("guest", "guest"))
            .unwrap();
        assert_eq!(stored.len(), 4 + 32, "salt then a SHA-256 digest");
        let (salt, digest) = stored.split_at(4);
        let mut expected = Sha256::new();
        expected.update(salt);
        expected.update(b"guest");
        assert_eq!(digest, expected.finalize().as_slice());
        assert_eq!(
            password_hash("guest", "guest"),
            password_hash("guest", "guest")
        );
        assert_ne!(
            password_hash("guest", "guest"),
            password_hash("guest", "other")
        );
    }

    #[test]
    fn the_relay_user_gets_its_own_names_only() {
        let d = Definitions::new(
            &default_topology(),
            "amqp://relay:pw@rabbitmq:5672/%2f",
            None,
        )
        .unwrap();
        assert_eq!(d.users.len(), 1);
        assert!(d.users[0].tags.is_empty(), "no administrator tag");
        let p = &d.permissions[0];
        assert_eq!(p.configure, r"^webhooks\.");
        assert_eq!(p.read, r"^webhooks\.");
        assert_eq!(p.write, r"^(webhooks\..*|amq\.default)$");

        // The prefix is matched literally: its dots and dashes are no wildcards.
        let p = relay_permission("relay", "/", "acme.prod-1");
        assert_eq!(p.configure, r"^acme\.prod\-1\.");
        assert_eq!(p.write, r"^(acme\.prod\-1\..*|amq\.default)$");
    }

    #[test]
    fn a_management_login_is_an_administrator_beside_the_relay() {
        let ui: ManagementLogin = "guest:guest".parse().unwrap();
        let d = Definitions::new(
            &default_topology(),
            "amqp://relay:relay@rabbitmq:5672/%2f",
            Some(&ui),
        )
        .unwrap();
        let names: Vec<&str> = d.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["relay", "guest"]);
        assert_eq!(d.users[1].tags, ["administrator"]);
        assert_eq!(d.users[1].password_hash, password_hash("guest", "guest"));
        assert_eq!(d.permissions[1].user, "guest");
        assert_eq!(d.permissions[1].configure, ".*");

        let same: ManagementLogin = "relay:x".parse().unwrap();
        assert!(
            Definitions::new(
                &default_topology(),
                "amqp://relay:relay@rabbitmq:5672/%2f",
                Some(&same)
            )
            .is_err()
        );
        assert!("nocolon".parse::<ManagementLogin>().is_err());
    }

    #[test]
    fn user_and_vhost_come_from_the_amqp_url() {
        let d = Definitions::new(
            &default_topology(),
            "amqp://relay:s%40cret@rabbitmq:5672/contact%2Dcenter",
            None,
        )
        .unwrap();
        assert_eq!(d.users[0].name, "relay");
        assert_eq!(d.users[0].password_hash, password_hash("relay", "s@cret"));
        assert_eq!(d.vhosts[0].name, "contact-center");
        assert_eq!(d.permissions[0].user, "relay");
        assert!(d.queues.iter().all(|q| q.vhost == "contact-center"));
        let json = d.to_pretty_json();
        assert!(
            !json.contains("s@cret"),
            "the password itself is never exported"
        );
    }

    #[test]
    fn queues_carry_exactly_the_declared_arguments() {
        let topology = default_topology();
        let d = Definitions::new(&topology, crate::config::DEFAULT_AMQP_URL, None).unwrap();
        let specs = topology.queues();
        assert_eq!(d.queues.len(), specs.len());
        assert_eq!(d.vhosts[0].name, "/");
        for (q, spec) in d.queues.iter().zip(&specs) {
            assert_eq!(q.name, spec.name);
            assert_eq!(q.arguments.len(), spec.args.len(), "{}", q.name);
            for (k, v) in &spec.args {
                assert_eq!(q.arguments.get(*k), Some(&json_value(v)), "{} {k}", q.name);
            }
        }
        let dlq = d.queues.last().unwrap();
        assert_eq!(dlq.name, "webhooks.dlq");
        assert_eq!(dlq.arguments["x-delivery-limit"], DLQ_DELIVERY_LIMIT);
        assert_eq!(d.queues[1].name, "webhooks.retry.01-2s");
        assert_eq!(d.queues[1].arguments["x-message-ttl"], 2000);
        assert_eq!(d.bindings[0].routing_key, "webhooks.work");
    }

    #[test]
    fn a_bad_url_is_an_error() {
        assert!(Definitions::new(&default_topology(), "http://x", None).is_err());
    }
}
