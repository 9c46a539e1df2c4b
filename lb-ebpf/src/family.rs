//! The address family as a type: code that is the same for IPv4 and IPv6 but for the address
//! and the maps it uses is written once, generic over [`Family`], and monomorphised for the
//! zero-sized [`V4`] and [`V6`]. Each implementation only names its own maps and compiles to
//! a map address, so the IPv4 copy of a generic function is the IPv4-only function it replaced
//! (the XDP and tc programs compile to the same instructions as before).
//!
//! Service ids, the slot table, the per-service counters, affinity and the events are shared by
//! both families (a slot cell names a backend of the family of its service's frontends), so
//! they are not here.

use aya_ebpf::{
    bindings::{
        bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2,
    },
    btf_maps::SkStorage,
    maps::{HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    Affinity4Key, Affinity6Key, AffinityValue, BackendValue, CtAddr, CtKey, CtValue, FlowCacheSlot,
    FrontendKey, FrontendSlot, FrontendSlotHead, Ipv6Words, ServiceValue, SockNat4Key, SockNat6Key,
    SockNatValue, SockState, SourceRange, flow_cache, frontend_filter, maglev, pair_filter,
};

use crate::maps::{
    AFFINITY4, AFFINITY6, ANSWER_CACHE4, ANSWER_CACHE6, BACKENDS4, BACKENDS6, CONFIG, CONFIG6,
    CONNTRACK4, CONNTRACK6, CT_SCRATCH4, CT_SCRATCH6, FLOW_CACHE4, FLOW_CACHE6, FRONTEND_INDEX4,
    FRONTEND_INDEX6, FRONTENDS4, FRONTENDS6, SOCK_NAT4, SOCK_NAT6, SOCK_STATE4, SOCK_STATE6,
    SOURCE_RANGES4, SOURCE_RANGES6,
};

/// An address family: its address type (network byte order, as the packet and `bpf_sock_addr`
/// hold it) and its maps.
pub trait Family {
    /// Network byte order in the maps the agent writes (frontends, backends); in a packet's
    /// [`crate::flow::Tuple`] and in conntrack, as [`CtAddr`] says (an IPv4 address as a
    /// number, an IPv6 one as the packet holds it).
    type Addr: CtAddr + 'static;
    /// Bits of an address: the prefix length that matches a whole one in an LPM trie.
    const ADDR_BITS: u32;

    /// 4 or 6, as `lb monitor`'s events say.
    const NUMBER: u8;

    /// Whether the XDP path calls its stages (a SNAT answer, a live flow, a packet to a
    /// frontend, a new flow) as BPF-to-BPF functions instead of inlining them. IPv6's
    /// addresses, tuples and conntrack values take so many registers and so much stack that one
    /// inlined program needs more than the 512 bytes of stack a program has (LLVM refuses to
    /// build it); the stages in frames of their own fit. IPv4 keeps them inline: a call and its
    /// return cost a few nanoseconds on its hot path.
    const OUT_OF_LINE: bool;

    /// The TCP gates of its flow cache and answer cache in `FLOW_CACHE_GATES`
    /// ([`lb_common::flow_cache::gate`]).
    const FLOW_CACHE_GATE: u32;
    const ANSWER_CACHE_GATE: u32;

    /// An address (network byte order) as `lb monitor`'s events hold it (an IPv4 address as a
    /// number in the first word).
    fn monitor_words(addr: Self::Addr) -> Ipv6Words;

    /// Whether two addresses are the same. Not `PartialEq`: an array's `==` compares its bytes
    /// as one block, which LLVM may lower to a `bcmp` call or to loads wider than a word;
    /// here it is plain 32-bit compares.
    fn same(a: &Self::Addr, b: &Self::Addr) -> bool;

    /// A packet's addresses (tuple order) and ports as the kernel's socket lookups take them,
    /// and the length of the family's part of it.
    fn socket_tuple(
        saddr: Self::Addr,
        daddr: Self::Addr,
        sport: u16,
        dport: u16,
    ) -> (bpf_sock_tuple, u32);

    /// A tuple's address (conntrack order) in the order of the agent's maps, and back.
    fn map_order(addr: Self::Addr) -> Self::Addr;
    fn tuple_order(addr: Self::Addr) -> Self::Addr;

    /// The bit of the frontend (and backend) filter for an address (tuple order), port and
    /// protocol.
    fn filter_bit(addr: Self::Addr, port: u16, protocol: u8) -> u32;

    /// The bit of the pair filter ([`lb_common::pair_filter`]) for a client's address (tuple
    /// order), port and protocol.
    fn pair_bit(addr: Self::Addr, port: u16, protocol: u8) -> u32;

    /// Maglev's flow hash (addresses in tuple order).
    fn flow_hash(saddr: Self::Addr, daddr: Self::Addr, sport: u16, dport: u16, proto: u8) -> u32;

    /// This node's address (tuple order) for SNAT to backends on other nodes, if it has one.
    fn snat_addr() -> Option<Self::Addr>;

    fn conntrack() -> &'static LruHashMap<CtKey<Self::Addr>, CtValue<Self::Addr>>;

    /// This CPU's scratch conntrack value, to build an entry in off the stack (a program runs
    /// on one CPU to its end, so nothing else uses it meanwhile).
    fn ct_scratch(index: u32) -> Option<&'static mut CtValue<Self::Addr>>;

    /// XDP's flow cache and tc egress's cache of local endpoints' answers
    /// ([`lb_common::flow_cache`]), and the index of a client's slot (address in tuple order,
    /// port) in both.
    fn flow_cache() -> &'static PerCpuArray<FlowCacheSlot<Self::Addr>>;
    fn answer_cache() -> &'static PerCpuArray<FlowCacheSlot<Self::Addr>>;
    fn cache_index(client: Self::Addr, port: u16) -> u32;

    /// This CPU's slot of the flow cache for a client and port: programs on other CPUs only
    /// ever empty it ([`crate::flow_cache::forget`]), and a program runs on one CPU to its end.
    #[inline(always)]
    fn flow_cache_slot(
        client: Self::Addr,
        port: u16,
    ) -> Option<&'static mut FlowCacheSlot<Self::Addr>> {
        // SAFETY: this CPU's own slot, as above.
        Self::flow_cache()
            .get_ptr_mut(Self::cache_index(client, port))
            .map(|slot| unsafe { &mut *slot })
    }

    /// The same in the answer cache, for the answer's destination.
    #[inline(always)]
    fn answer_cache_slot(
        client: Self::Addr,
        port: u16,
    ) -> Option<&'static mut FlowCacheSlot<Self::Addr>> {
        // SAFETY: as in flow_cache_slot.
        Self::answer_cache()
            .get_ptr_mut(Self::cache_index(client, port))
            .map(|slot| unsafe { &mut *slot })
    }

    /// The session-affinity entry of a client outside the node (address in tuple order) of a
    /// service, and its writer.
    fn affinity_entry(client: Self::Addr, service_id: u32) -> Option<*mut AffinityValue>;
    fn remember_affinity(client: Self::Addr, service_id: u32, value: &AffinityValue);

    fn frontends() -> &'static HashMap<FrontendKey<Self::Addr>, ServiceValue>;
    /// Slot `index` of the family's frontend index.
    fn frontend_slot(index: u32) -> Option<&'static FrontendSlotHead<Self::Addr>>;
    /// Cell `cell` of the selection table slot `index` of the frontend index carries, if it
    /// carries the table ([`lb_common::FrontendSlot`]).
    fn inline_backend(index: u32, cell: u64) -> Option<u32>;
    /// The backend `id` names, if it is one of this family's. A reference, not a copy: LLVM
    /// would read an `Option`'s unset payload where branches merge, which the verifier refuses.
    fn backend(id: u32) -> Option<&'static BackendValue<Self::Addr>>;
    fn source_ranges() -> &'static LpmTrie<SourceRange<Self::Addr>, u8>;
    fn sock_state() -> &'static SkStorage<SockState<Self::Addr>>;

    // The socket NAT map, keyed by (socket cookie, backend address, backend port): the keys'
    // layouts differ (the cookie's alignment pads an IPv6 key more), and each is built where
    // the map takes its address, so that it is written to the stack field by field.
    fn sock_nat_insert(
        cookie: u64,
        addr: Self::Addr,
        port: u16,
        value: &SockNatValue<Self::Addr>,
    ) -> Result<(), i32>;
    fn sock_nat_get(cookie: u64, addr: Self::Addr, port: u16) -> Option<SockNatValue<Self::Addr>>;
    fn sock_nat_remove(cookie: u64, addr: Self::Addr, port: u16);
}

/// IPv4: `u32` addresses, the `lb4_*` maps.
pub struct V4;

/// IPv6: [`Ipv6Words`] addresses, the `lb6_*` maps.
pub struct V6;

impl Family for V4 {
    type Addr = u32;
    const ADDR_BITS: u32 = 32;
    const NUMBER: u8 = 4;
    const OUT_OF_LINE: bool = false;
    const FLOW_CACHE_GATE: u32 = flow_cache::gate::XDP4;
    const ANSWER_CACHE_GATE: u32 = flow_cache::gate::ANSWER4;

    #[inline(always)]
    fn monitor_words(addr: u32) -> Ipv6Words {
        [u32::from_be(addr), 0, 0, 0]
    }

    #[inline(always)]
    fn same(a: &u32, b: &u32) -> bool {
        a == b
    }

    #[inline(always)]
    fn socket_tuple(saddr: u32, daddr: u32, sport: u16, dport: u16) -> (bpf_sock_tuple, u32) {
        let ipv4 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 {
            saddr: saddr.to_be(),
            daddr: daddr.to_be(),
            sport: sport.to_be(),
            dport: dport.to_be(),
        };
        (
            bpf_sock_tuple {
                __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 { ipv4 },
            },
            size_of_val(&ipv4) as u32,
        )
    }

    #[inline(always)]
    fn map_order(addr: u32) -> u32 {
        addr.to_be()
    }

    #[inline(always)]
    fn tuple_order(addr: u32) -> u32 {
        u32::from_be(addr)
    }

    #[inline(always)]
    fn filter_bit(addr: u32, port: u16, protocol: u8) -> u32 {
        frontend_filter::bit(addr, port, protocol)
    }

    #[inline(always)]
    fn pair_bit(addr: u32, port: u16, protocol: u8) -> u32 {
        pair_filter::bit(addr, port, protocol)
    }

    #[inline(always)]
    fn flow_hash(saddr: u32, daddr: u32, sport: u16, dport: u16, proto: u8) -> u32 {
        maglev::flow_hash(saddr, daddr, sport, dport, proto)
    }

    #[inline(always)]
    fn snat_addr() -> Option<u32> {
        CONFIG
            .get(0)
            .map(|config| config.snat_addr)
            .filter(|addr| *addr != 0)
    }

    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey<u32>, CtValue<u32>> {
        &CONNTRACK4
    }

    #[inline(always)]
    fn ct_scratch(index: u32) -> Option<&'static mut CtValue<u32>> {
        // SAFETY: this CPU's own entry, used by one program run at a time.
        CT_SCRATCH4
            .get_ptr_mut(index)
            .map(|entry| unsafe { &mut *entry })
    }

    #[inline(always)]
    fn flow_cache() -> &'static PerCpuArray<FlowCacheSlot<u32>> {
        &FLOW_CACHE4
    }

    #[inline(always)]
    fn answer_cache() -> &'static PerCpuArray<FlowCacheSlot<u32>> {
        &ANSWER_CACHE4
    }

    #[inline(always)]
    fn cache_index(client: u32, port: u16) -> u32 {
        flow_cache::slot(client, port)
    }

    #[inline(always)]
    fn affinity_entry(client: u32, service_id: u32) -> Option<*mut AffinityValue> {
        AFFINITY4.get_ptr_mut(&Affinity4Key {
            client: u64::from(client),
            service_id,
            kind: 0,
        })
    }

    #[inline(always)]
    fn remember_affinity(client: u32, service_id: u32, value: &AffinityValue) {
        let key = Affinity4Key {
            client: u64::from(client),
            service_id,
            kind: 0,
        };
        // A full LRU evicts the oldest client; affinity is best effort.
        let _ = AFFINITY4.insert(&key, value, 0);
    }

    #[inline(always)]
    fn frontends() -> &'static HashMap<FrontendKey<u32>, ServiceValue> {
        &FRONTENDS4
    }

    #[inline(always)]
    fn frontend_slot(index: u32) -> Option<&'static FrontendSlotHead<u32>> {
        FRONTEND_INDEX4.get(index).map(|slot| &slot.head)
    }

    #[inline(always)]
    fn inline_backend(index: u32, cell: u64) -> Option<u32> {
        inline_backend(FRONTEND_INDEX4.get(index)?, cell)
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<&'static BackendValue<u32>> {
        BACKENDS4.get(id).filter(|backend| backend.in_use())
    }

    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange<u32>, u8> {
        &SOURCE_RANGES4
    }

    #[inline(always)]
    fn sock_state() -> &'static SkStorage<SockState<u32>> {
        &SOCK_STATE4
    }

    #[inline(always)]
    fn sock_nat_insert(
        cookie: u64,
        addr: u32,
        port: u16,
        value: &SockNatValue<u32>,
    ) -> Result<(), i32> {
        let key = SockNat4Key {
            cookie,
            addr,
            port,
            _pad: [0; 2],
        };
        SOCK_NAT4.insert(&key, value, 0)
    }

    #[inline(always)]
    fn sock_nat_get(cookie: u64, addr: u32, port: u16) -> Option<SockNatValue<u32>> {
        let key = SockNat4Key {
            cookie,
            addr,
            port,
            _pad: [0; 2],
        };
        // SAFETY: a read-only copy of an entry written whole.
        unsafe { SOCK_NAT4.get(&key) }.copied()
    }

    #[inline(always)]
    fn sock_nat_remove(cookie: u64, addr: u32, port: u16) {
        let key = SockNat4Key {
            cookie,
            addr,
            port,
            _pad: [0; 2],
        };
        // Gone already (evicted by the LRU) is as good.
        let _ = SOCK_NAT4.remove(&key);
    }
}

impl Family for V6 {
    type Addr = Ipv6Words;
    const ADDR_BITS: u32 = 128;
    const NUMBER: u8 = 6;
    const OUT_OF_LINE: bool = true;
    const FLOW_CACHE_GATE: u32 = flow_cache::gate::XDP6;
    const ANSWER_CACHE_GATE: u32 = flow_cache::gate::ANSWER6;

    #[inline(always)]
    fn monitor_words(addr: Ipv6Words) -> Ipv6Words {
        addr
    }

    #[inline(always)]
    fn same(a: &Ipv6Words, b: &Ipv6Words) -> bool {
        a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
    }

    #[inline(always)]
    fn socket_tuple(
        saddr: Ipv6Words,
        daddr: Ipv6Words,
        sport: u16,
        dport: u16,
    ) -> (bpf_sock_tuple, u32) {
        let ipv6 = bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 {
            saddr,
            daddr,
            sport: sport.to_be(),
            dport: dport.to_be(),
        };
        (
            bpf_sock_tuple {
                __bindgen_anon_1: bpf_sock_tuple__bindgen_ty_1 { ipv6 },
            },
            size_of_val(&ipv6) as u32,
        )
    }

    #[inline(always)]
    fn map_order(addr: Ipv6Words) -> Ipv6Words {
        addr
    }

    #[inline(always)]
    fn tuple_order(addr: Ipv6Words) -> Ipv6Words {
        addr
    }

    #[inline(always)]
    fn filter_bit(addr: Ipv6Words, port: u16, protocol: u8) -> u32 {
        frontend_filter::bit6(addr, port, protocol)
    }

    #[inline(always)]
    fn pair_bit(addr: Ipv6Words, port: u16, protocol: u8) -> u32 {
        pair_filter::bit6(addr, port, protocol)
    }

    #[inline(always)]
    fn flow_hash(saddr: Ipv6Words, daddr: Ipv6Words, sport: u16, dport: u16, proto: u8) -> u32 {
        maglev::flow_hash6(saddr, daddr, sport, dport, proto)
    }

    #[inline(always)]
    fn snat_addr() -> Option<Ipv6Words> {
        CONFIG6
            .get(0)
            .map(|config| config.snat_addr)
            .filter(|addr| addr[0] | addr[1] | addr[2] | addr[3] != 0)
    }

    #[inline(always)]
    fn conntrack() -> &'static LruHashMap<CtKey<Ipv6Words>, CtValue<Ipv6Words>> {
        &CONNTRACK6
    }

    #[inline(always)]
    fn ct_scratch(index: u32) -> Option<&'static mut CtValue<Ipv6Words>> {
        // SAFETY: this CPU's own entry, used by one program run at a time.
        CT_SCRATCH6
            .get_ptr_mut(index)
            .map(|entry| unsafe { &mut *entry })
    }

    #[inline(always)]
    fn flow_cache() -> &'static PerCpuArray<FlowCacheSlot<Ipv6Words>> {
        &FLOW_CACHE6
    }

    #[inline(always)]
    fn answer_cache() -> &'static PerCpuArray<FlowCacheSlot<Ipv6Words>> {
        &ANSWER_CACHE6
    }

    #[inline(always)]
    fn cache_index(client: Ipv6Words, port: u16) -> u32 {
        flow_cache::slot6(client, port)
    }

    #[inline(always)]
    fn affinity_entry(client: Ipv6Words, service_id: u32) -> Option<*mut AffinityValue> {
        AFFINITY6.get_ptr_mut(&Affinity6Key { client, service_id })
    }

    #[inline(always)]
    fn remember_affinity(client: Ipv6Words, service_id: u32, value: &AffinityValue) {
        // A full LRU evicts the oldest client; affinity is best effort.
        let _ = AFFINITY6.insert(&Affinity6Key { client, service_id }, value, 0);
    }

    #[inline(always)]
    fn frontend_slot(index: u32) -> Option<&'static FrontendSlotHead<Ipv6Words>> {
        FRONTEND_INDEX6.get(index).map(|slot| &slot.head)
    }

    #[inline(always)]
    fn inline_backend(index: u32, cell: u64) -> Option<u32> {
        inline_backend(FRONTEND_INDEX6.get(index)?, cell)
    }

    #[inline(always)]
    fn frontends() -> &'static HashMap<FrontendKey<Ipv6Words>, ServiceValue> {
        &FRONTENDS6
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<&'static BackendValue<Ipv6Words>> {
        BACKENDS6.get(id).filter(|backend| backend.in_use())
    }

    #[inline(always)]
    fn source_ranges() -> &'static LpmTrie<SourceRange<Ipv6Words>, u8> {
        &SOURCE_RANGES6
    }

    #[inline(always)]
    fn sock_state() -> &'static SkStorage<SockState<Ipv6Words>> {
        &SOCK_STATE6
    }

    #[inline(always)]
    fn sock_nat_insert(
        cookie: u64,
        addr: Ipv6Words,
        port: u16,
        value: &SockNatValue<Ipv6Words>,
    ) -> Result<(), i32> {
        let key = SockNat6Key {
            cookie,
            addr,
            port,
            _pad: [0; 6],
        };
        SOCK_NAT6.insert(&key, value, 0)
    }

    #[inline(always)]
    fn sock_nat_get(cookie: u64, addr: Ipv6Words, port: u16) -> Option<SockNatValue<Ipv6Words>> {
        let key = SockNat6Key {
            cookie,
            addr,
            port,
            _pad: [0; 6],
        };
        // SAFETY: a read-only copy of an entry written whole.
        unsafe { SOCK_NAT6.get(&key) }.copied()
    }

    #[inline(always)]
    fn sock_nat_remove(cookie: u64, addr: Ipv6Words, port: u16) {
        let key = SockNat6Key {
            cookie,
            addr,
            port,
            _pad: [0; 6],
        };
        // Gone already (evicted by the LRU) is as good.
        let _ = SOCK_NAT6.remove(&key);
    }
}

/// Cell `cell` of the selection table a frontend-index slot carries, if it carries it. The slot
/// is the one the frontend was found in during this run: the agent rewrites a slot only a
/// grace period after it stopped being live, so it still holds that frontend's table.
#[inline(always)]
fn inline_backend<A, const N: usize>(slot: &FrontendSlot<A, N>, cell: u64) -> Option<u32> {
    if cell >= u64::from(slot.head.inline_backends) {
        return None;
    }
    slot.backends.get(cell as usize).copied()
}
