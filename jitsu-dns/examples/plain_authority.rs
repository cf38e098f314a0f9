//! The baseline of `bench/dns-qps`: a plain hickory-server authority (a `Catalog` with one
//! in-memory zone) serving the same A records as jitsu-dns does for running VMs, on the same
//! current-thread tokio runtime, over UDP and TCP.
//!
//! `plain_authority <addr:port> <n>` serves `vm0.example.org` .. `vm<n-1>.example.org` with
//! A `10.77.1.1` .. and AAAA `fd77::1:1` .., and the zone's SOA and NS, TTL 60, until killed.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::rr::rdata::{A, AAAA, NS, SOA};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordSet, RrKey};
use hickory_server::Server;
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, n] = args.as_slice() else {
        anyhow::bail!("usage: plain_authority <addr:port> <n>");
    };
    let addr: SocketAddr = addr.parse()?;
    let n: u32 = n.parse()?;
    let origin = Name::from_ascii("example.org.")?;
    let ns = Name::from_ascii("ns.example.org.")?;
    let mut records: BTreeMap<RrKey, RecordSet> = BTreeMap::new();
    let mut add = |r: Record| {
        let key = RrKey::new(LowerName::new(&r.name), r.record_type());
        records
            .entry(key)
            .or_insert_with(|| RecordSet::new(r.name.clone(), r.record_type(), 1))
            .insert(r, 1);
    };
    let soa = SOA::new(
        ns.clone(),
        Name::from_ascii("hostmaster.example.org.")?,
        1,
        3600,
        600,
        86400,
        60,
    );
    add(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)));
    add(Record::from_rdata(origin.clone(), 60, RData::NS(NS(ns))));
    for i in 0..n {
        let name = Name::from_ascii(format!("vm{i}.example.org."))?;
        let (hi, lo) = (1 + (i / 250) as u8, (i % 250) as u8 + 1);
        let ip6 = Ipv6Addr::new(0xfd77, 0, 0, 0, 0, 0, hi.into(), lo.into());
        add(Record::from_rdata(name.clone(), 60, RData::AAAA(AAAA(ip6))));
        add(Record::from_rdata(
            name,
            60,
            RData::A(A(Ipv4Addr::new(10, 77, hi, lo))),
        ));
    }
    let zone = InMemoryZoneHandler::<hickory_server::net::runtime::TokioRuntimeProvider>::new(
        origin.clone(),
        records,
        ZoneType::Primary,
        AxfrPolicy::Deny,
    )
    .map_err(anyhow::Error::msg)?;
    let mut catalog = Catalog::new();
    catalog.upsert(LowerName::new(&origin), vec![Arc::new(zone)]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut server = Server::new(catalog);
        server.register_socket(tokio::net::UdpSocket::bind(addr).await?);
        server.register_listener(
            tokio::net::TcpListener::bind(addr).await?,
            Duration::from_secs(10),
            32,
        );
        eprintln!("plain authority serving {n} names on {addr}");
        server.block_until_done().await?;
        Ok(())
    })
}
