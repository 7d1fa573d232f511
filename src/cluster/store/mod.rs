//! The cluster directory in a shared store (etcd): this replica's routes published under its
//! lease, and a full in-memory copy of everyone's, fed by a watch.
