//! Merkle tree hashes and inclusion proofs over ledger entries, as RFC 6962 defines
//! them (leaf hash `SHA-256(0x00 || entry)`, node hash `SHA-256(0x01 || left || right)`,
//! left subtree the largest power of two below the size).

use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];

pub fn leaf_hash(entry: &[u8]) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([0u8]);
    hasher.update(entry);
    hasher.finalize().into()
}

fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut hasher = Sha256::new();
    hasher.update([1u8]);
    hasher.update(left);
    hasher.update(right);
    hasher.finalize().into()
}

/// The largest power of two strictly below `n` (`n` ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// The Merkle tree hash of `leaves` (leaf hashes).
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The right edge of a growing tree: the roots of its perfect subtrees, largest first.
/// Appending a leaf and reading the root both cost O(log n), so the ledger can sign a
/// checkpoint without rehashing every entry.
#[derive(Debug, Clone, Default)]
pub struct Frontier {
    /// (height, root) of each perfect subtree, heights strictly decreasing.
    nodes: Vec<(u32, Hash)>,
}

impl Frontier {
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (0, leaf);
        while let Some(&(height, left)) = self.nodes.last() {
            if height != node.0 {
                break;
            }
            self.nodes.pop();
            node = (height + 1, node_hash(&left, &node.1));
        }
        self.nodes.push(node);
    }

    /// The Merkle tree hash of every leaf pushed so far.
    pub fn root(&self) -> Hash {
        let mut nodes = self.nodes.iter().rev();
        let Some(&(_, mut hash)) = nodes.next() else {
            return Sha256::digest([]).into();
        };
        for (_, left) in nodes {
            hash = node_hash(left, &hash);
        }
        hash
    }
}

/// The audit path of leaf `index` in the tree of `leaves`.
pub fn inclusion_path(index: usize, leaves: &[Hash]) -> Vec<Hash> {
    let n = leaves.len();
    if n <= 1 {
        return Vec::new();
    }
    let k = split(n);
    if index < k {
        let mut path = inclusion_path(index, &leaves[..k]);
        path.push(root(&leaves[k..]));
        path
    } else {
        let mut path = inclusion_path(index - k, &leaves[k..]);
        path.push(root(&leaves[..k]));
        path
    }
}

/// Whether `path` proves leaf `leaf` at `index` in a tree of `size` with `root`
/// (the verification algorithm of RFC 9162, section 2.1.3.2).
pub fn verify_inclusion(
    leaf: &Hash,
    index: u64,
    size: u64,
    path: &[Hash],
    expected: &Hash,
) -> bool {
    if index >= size {
        return false;
    }
    let (mut fn_, mut sn) = (index, size - 1);
    let mut hash = *leaf;
    for sibling in path {
        if sn == 0 {
            return false;
        }
        if fn_ & 1 == 1 || fn_ == sn {
            hash = node_hash(sibling, &hash);
            while fn_ & 1 == 0 && fn_ != 0 {
                fn_ >>= 1;
                sn >>= 1;
            }
        } else {
            hash = node_hash(&hash, sibling);
        }
        fn_ >>= 1;
        sn >>= 1;
    }
    sn == 0 && &hash == expected
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n)
            .map(|i| leaf_hash(format!("entry {i}").as_bytes()))
            .collect()
    }

    #[test]
    fn empty_and_single_trees() {
        assert_eq!(
            hex::encode(root(&[])),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let one = leaves(1);
        assert_eq!(root(&one), one[0]);
    }

    #[test]
    fn every_leaf_of_every_size_proves_and_no_other() {
        for n in 1..=33 {
            let tree = leaves(n);
            let top = root(&tree);
            for i in 0..n {
                let path = inclusion_path(i, &tree);
                assert!(
                    verify_inclusion(&tree[i], i as u64, n as u64, &path, &top),
                    "n={n} i={i}"
                );
                let other = leaf_hash(b"not in the tree");
                assert!(!verify_inclusion(&other, i as u64, n as u64, &path, &top));
                if n > 1 {
                    let wrong = (i + 1) % n;
                    assert!(
                        !verify_inclusion(&tree[i], wrong as u64, n as u64, &path, &top)
                            || tree[i] == tree[wrong]
                    );
                }
            }
        }
    }

    #[test]
    fn the_frontier_agrees_with_the_full_tree() {
        let all = leaves(100);
        let mut frontier = Frontier::default();
        assert_eq!(frontier.root(), root(&[]));
        for n in 1..=100 {
            frontier.push(all[n - 1]);
            assert_eq!(frontier.root(), root(&all[..n]), "n={n}");
        }
    }

    /// RFC 6962's structure: a tree of three is `H(1 || H(1 || a || b) || c)`.
    #[test]
    fn three_leaves_split_two_and_one() {
        let tree = leaves(3);
        assert_eq!(
            root(&tree),
            node_hash(&node_hash(&tree[0], &tree[1]), &tree[2])
        );
    }
}
