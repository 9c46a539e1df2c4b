//! The XDP packet counter (`lb_xdp_count`): load it, attach it to a NIC, read what it counted.

use std::os::fd::{AsFd, BorrowedFd};

use aya::{
    Ebpf, EbpfLoader,
    maps::PerCpuArray,
    programs::{NetworkInterface, ProgramError, Xdp, XdpMode},
};
use lb_common::{PacketClass, PacketCounter, map_names, program_names};

use super::object::COUNTER_OBJECT;

#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("loading the eBPF object")]
    Load(#[from] aya::EbpfError),
    #[error("program {0} missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("program {program}: {operation}")]
    Program {
        program: &'static str,
        operation: &'static str,
        source: ProgramError,
    },
    #[error("map {map}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

/// The loaded counter program with its own private maps. Dropping it detaches every attachment
/// it made and frees the program and maps.
pub struct XdpCounter {
    ebpf: Ebpf,
}

/// Counters of one [`PacketClass`], summed over every CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassCount {
    pub class: PacketClass,
    pub label: &'static str,
    pub counter: PacketCounter,
}

impl XdpCounter {
    /// Loads the object and the counter program into the kernel (not attached anywhere yet).
    pub fn load() -> Result<Self, CounterError> {
        let mut ebpf = EbpfLoader::new().load(COUNTER_OBJECT)?;
        let program = xdp_program(&mut ebpf)?;
        program.load().map_err(|source| CounterError::Program {
            program: program_names::XDP_COUNTER,
            operation: "load",
            source,
        })?;
        Ok(Self { ebpf })
    }

    /// Attaches the counter to an interface of the calling thread's network namespace.
    pub fn attach<'a>(
        &mut self,
        interface: impl Into<NetworkInterface<'a>>,
        mode: XdpMode,
    ) -> Result<(), CounterError> {
        xdp_program(&mut self.ebpf)?
            .attach(interface, mode)
            .map_err(|source| CounterError::Program {
                program: program_names::XDP_COUNTER,
                operation: "attach",
                source,
            })?;
        Ok(())
    }

    /// The program, e.g. for [`super::testrun::test_run`].
    pub fn program_fd(&self) -> Result<BorrowedFd<'_>, CounterError> {
        let program: &Xdp = self
            .ebpf
            .program(program_names::XDP_COUNTER)
            .ok_or(CounterError::MissingProgram(program_names::XDP_COUNTER))?
            .try_into()
            .map_err(|source| CounterError::Program {
                program: program_names::XDP_COUNTER,
                operation: "type check",
                source,
            })?;
        let fd = program.fd().map_err(|source| CounterError::Program {
            program: program_names::XDP_COUNTER,
            operation: "fd",
            source,
        })?;
        Ok(fd.as_fd())
    }

    /// Every class with its packets and bytes summed over CPUs, in [`PacketClass::ALL`] order.
    pub fn read(&self) -> Result<Vec<ClassCount>, CounterError> {
        let map = self
            .ebpf
            .map(map_names::PACKET_COUNTERS)
            .ok_or(CounterError::MissingMap(map_names::PACKET_COUNTERS))?;
        let counters = PerCpuArray::<_, PacketCounter>::try_from(map).map_err(map_error)?;
        PacketClass::ALL
            .iter()
            .map(|&(class, label)| {
                let per_cpu = counters.get(&class.0, 0).map_err(map_error)?;
                let counter =
                    per_cpu
                        .iter()
                        .fold(PacketCounter::default(), |sum, cpu| PacketCounter {
                            packets: sum.packets + cpu.packets,
                            bytes: sum.bytes + cpu.bytes,
                        });
                Ok(ClassCount {
                    class,
                    label,
                    counter,
                })
            })
            .collect()
    }
}

fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, CounterError> {
    ebpf.program_mut(program_names::XDP_COUNTER)
        .ok_or(CounterError::MissingProgram(program_names::XDP_COUNTER))?
        .try_into()
        .map_err(|source| CounterError::Program {
            program: program_names::XDP_COUNTER,
            operation: "type check",
            source,
        })
}

fn map_error(source: aya::maps::MapError) -> CounterError {
    CounterError::Map {
        map: map_names::PACKET_COUNTERS,
        source,
    }
}
