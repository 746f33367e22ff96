//! The nodes connected right now, by name.

use std::collections::HashMap;
use std::sync::Mutex;

/// A node's live control connection and the data-plane address it announced.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    /// The control connection (the coordinator opens one stream per job on it).
    pub conn: quinn::Connection,
    /// Where other nodes reach its data plane.
    pub data_addr: String,
}

/// Connected nodes. A node that reconnects replaces its older connection.
#[derive(Debug, Default)]
pub struct Registry {
    nodes: Mutex<HashMap<String, NodeHandle>>,
}

impl Registry {
    /// Records a node's connection.
    pub fn insert(&self, name: &str, handle: NodeHandle) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = nodes.insert(name.to_owned(), handle) {
            old.conn
                .close(0u32.into(), b"replaced by a newer connection");
        }
    }

    /// Forgets a node's connection, if it is still `conn` (and not a newer one).
    pub fn remove(&self, name: &str, conn: &quinn::Connection) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if nodes
            .get(name)
            .is_some_and(|h| h.conn.stable_id() == conn.stable_id())
        {
            nodes.remove(name);
        }
    }

    /// The node's handle, if it is connected.
    pub fn get(&self, name: &str) -> Option<NodeHandle> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.get(name).cloned()
    }

    /// Names of the connected nodes, sorted.
    pub fn names(&self) -> Vec<String> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut names: Vec<String> = nodes.keys().cloned().collect();
        names.sort();
        names
    }
}
