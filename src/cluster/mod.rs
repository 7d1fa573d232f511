//! Several replicas that act as one (`[cluster]`): a shared directory of which replica holds
//! which tunnel (`store`, etcd), and an authenticated private link between replicas that opens
//! a channel on the owner's side for a visitor who landed elsewhere (`peer`). Nothing here runs
//! without a `[cluster]` section.

pub mod peer;
pub(crate) mod select;
pub(crate) mod store;
