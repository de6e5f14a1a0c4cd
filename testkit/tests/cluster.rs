//! The local cluster: six nodes, three masters covering every slot, a master killed and
//! replaced by its replica, the killed node rejoining.

use testkit::{RedisCluster, command_at};

#[test]
fn a_cluster_starts_fails_over_and_takes_its_node_back() {
    let started = std::time::Instant::now();
    let mut cluster = RedisCluster::start();
    println!("cluster ready in {:?}", started.elapsed());
    let topology = cluster.topology();
    assert_eq!(topology.len(), 6);
    let masters: Vec<_> = topology.iter().filter(|n| n.master).collect();
    assert_eq!(masters.len(), 3);
    let served: u32 = masters
        .iter()
        .flat_map(|m| m.slots.iter())
        .map(|&(a, b)| u32::from(b - a) + 1)
        .sum();
    assert_eq!(served, 16384);

    let key = "{user:42}";
    let owner = cluster.master_of(key);
    let addr = cluster.nodes()[owner].addr();
    assert_eq!(command_at(addr, &["SET", key, "v1"]), "OK");
    // Wait for the replica to have it (WAIT 1 replica, 1 s).
    assert_eq!(command_at(addr, &["WAIT", "1", "1000"]), "1");

    let (victim, took) = cluster.fail_over(key);
    assert_eq!(victim, owner);
    println!("failover of the master of {key}: {took:?}");
    let new_owner = cluster.master_of(key);
    assert_ne!(new_owner, victim);
    // The new master answers for the key's slot (MOVED nowhere). Whether the value survived
    // is Redis's asynchronous replication, not ours to assert: seen lost in some runs here
    // even after `WAIT 1` acknowledged it (noted in issue 7).
    let reply = command_at(cluster.nodes()[new_owner].addr(), &["GET", key]);
    assert!(!reply.starts_with("ERR"), "{reply}");
    println!("value after failover: {reply:?}");

    cluster.restart(victim);
    let rejoined = cluster
        .topology()
        .into_iter()
        .find(|n| n.addr == cluster.nodes()[victim].addr())
        .expect("the restarted node is in the topology");
    assert!(!rejoined.master, "it came back as a replica");
}
