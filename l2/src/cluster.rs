//! What only a Redis Cluster needs: its nodes (`CLUSTER SLOTS`), and pipelines split by hash
//! slot.

use std::collections::HashMap;

use redis::Value;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SlotAddr};

use crate::connection::{Connection, query_with_wait};
use crate::error::Result;

impl Connection {
    /// The masters of a cluster as `(host, port)` (from `CLUSTER SLOTS`); empty on one
    /// server.
    pub(crate) async fn masters(&self) -> Result<Vec<(String, u16)>> {
        if !self.is_cluster() {
            return Ok(Vec::new());
        }
        Ok(self
            .cluster_nodes()
            .await?
            .into_iter()
            .filter(|n| n.2)
            .map(|n| (n.0, n.1))
            .collect())
    }

    /// Every node of a cluster as `(host, port, is_master)`, masters first; empty on one
    /// server.
    pub(crate) async fn cluster_nodes(&self) -> Result<Vec<(String, u16, bool)>> {
        if !self.is_cluster() {
            return Ok(Vec::new());
        }
        let slots: Vec<Value> = self
            .query("cluster slots", redis::cmd("CLUSTER").arg("SLOTS"))
            .await?;
        let mut masters = Vec::new();
        let mut replicas = Vec::new();
        for range in &slots {
            let Value::Array(parts) = range else { continue };
            for (i, node) in parts.iter().skip(2).enumerate() {
                let Value::Array(node) = node else { continue };
                let host = match node.first() {
                    Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    Some(Value::SimpleString(s)) => s.clone(),
                    _ => continue,
                };
                let Some(Value::Int(port)) = node.get(1) else {
                    continue;
                };
                let Ok(port) = u16::try_from(*port) else {
                    continue;
                };
                let list = if i == 0 { &mut masters } else { &mut replicas };
                if !list.contains(&(host.clone(), port)) {
                    list.push((host, port));
                }
            }
        }
        let mut nodes: Vec<(String, u16, bool)> =
            masters.into_iter().map(|(h, p)| (h, p, true)).collect();
        nodes.extend(replicas.into_iter().map(|(h, p)| (h, p, false)));
        Ok(nodes)
    }
}

/// The key a command of ours works on: the first argument after the name, or for `EVAL` /
/// `EVALSHA` the first key after the key count.
fn first_key(cmd: &redis::Cmd) -> Option<Vec<u8>> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .filter_map(|a| match a {
            redis::Arg::Simple(bytes) => Some(bytes),
            _ => None,
        })
        .collect();
    let name = args.first()?;
    let at = if name.eq_ignore_ascii_case(b"EVAL") || name.eq_ignore_ascii_case(b"EVALSHA") {
        3
    } else {
        1
    };
    args.get(at).map(|k| k.to_vec())
}

/// Runs `pipe` on a cluster as one pipeline per hash slot, concurrently, and puts the replies
/// back in `pipe`'s order. Each part keeps errors in place; unless `keep_errors`, the first
/// server error fails the whole (as one server's pipeline would). With `wait`, each part ends
/// with that `WAIT`, whose replies are returned apart.
pub(crate) async fn split_by_slot(
    cluster: &ClusterConnection,
    pipe: &redis::Pipeline,
    keep_errors: bool,
    wait: Option<&(redis::Cmd, u32)>,
) -> redis::RedisResult<(Vec<Value>, Vec<Value>)> {
    // One slot (a single key's read or write, the common case): the cluster client routes
    // the pipeline as it is.
    let mut slots = pipe
        .cmd_iter()
        .map(|cmd| first_key(cmd).map(|k| Route::with_key(&k, SlotAddr::Master)));
    if let Some(Some(first)) = slots.next()
        && slots.all(|r| r == Some(first))
    {
        let mut conn = cluster.clone();
        let (values, acks) = query_with_wait(&mut conn, pipe, wait).await?;
        return no_errors_unless(keep_errors, values).map(|v| (v, acks));
    }
    let mut acks = Vec::new();
    let mut parts: HashMap<Route, (redis::Pipeline, Vec<usize>)> = HashMap::new();
    let mut total = 0;
    for (i, cmd) in pipe.cmd_iter().enumerate() {
        total += 1;
        let key = first_key(cmd).ok_or_else(|| {
            redis::RedisError::from((
                redis::ErrorKind::Client,
                "a cluster pipeline command without a key",
            ))
        })?;
        let (part, at) = parts
            .entry(Route::with_key(&key, SlotAddr::Master))
            .or_insert_with(|| {
                let mut p = redis::pipe();
                if pipe.is_transaction() {
                    p.atomic();
                }
                p.ignore_errors();
                (p, Vec::new())
            });
        part.add_command(cmd.clone());
        at.push(i);
    }
    let runs = parts.into_values().map(|(mut part, at)| {
        let mut conn = cluster.clone();
        if let Some((wait, _)) = wait {
            part.add_command(wait.clone());
        }
        async move {
            let values: Vec<Value> = part.query_async(&mut conn).await?;
            Ok::<_, redis::RedisError>((values, at))
        }
    });
    let mut out = vec![Value::Nil; total];
    for result in futures_util::future::join_all(runs).await {
        let (mut values, at) = result?;
        if wait.is_some() {
            acks.extend(values.pop());
        }
        if values.len() != at.len() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "wrong number of replies to a cluster pipeline part",
            )));
        }
        for (value, i) in values.into_iter().zip(at) {
            out[i] = value;
        }
    }
    no_errors_unless(keep_errors, out).map(|v| (v, acks))
}

/// `values`, or the first server error among them unless `keep_errors`.
fn no_errors_unless(keep_errors: bool, values: Vec<Value>) -> redis::RedisResult<Vec<Value>> {
    if !keep_errors
        && let Some(Value::ServerError(e)) =
            values.iter().find(|v| matches!(v, Value::ServerError(_)))
    {
        return Err(e.clone().into());
    }
    Ok(values)
}
