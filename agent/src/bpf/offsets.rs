//! The kernel struct members the eBPF programs read, resolved from BTF at start-up.
use agent_common as abi;

use super::btf::{BtfError, KernelBtf};

/// (global name in the eBPF object, struct, member path).
pub const OFFSETS: &[(&str, &str, &str)] = &[
    (abi::GLOBAL_OFF_BPRM_FILE, "linux_binprm", "file"),
    (abi::GLOBAL_OFF_BPRM_FILENAME, "linux_binprm", "filename"),
    (abi::GLOBAL_OFF_FILE_F_PATH, "file", "f_path"),
    (abi::GLOBAL_OFF_FILE_F_INODE, "file", "f_inode"),
    (abi::GLOBAL_OFF_FILE_F_MODE, "file", "f_mode"),
    (abi::GLOBAL_OFF_INODE_I_INO, "inode", "i_ino"),
    (abi::GLOBAL_OFF_INODE_I_SB, "inode", "i_sb"),
    (abi::GLOBAL_OFF_INODE_I_NLINK, "inode", "i_nlink"),
    (abi::GLOBAL_OFF_SB_S_DEV, "super_block", "s_dev"),
    (abi::GLOBAL_OFF_MSGHDR_MSG_NAME, "msghdr", "msg_name"),
    (abi::GLOBAL_OFF_SOCKET_TYPE, "socket", "type"),
    (abi::GLOBAL_OFF_PATH_DENTRY, "path", "dentry"),
    (
        abi::GLOBAL_OFF_DENTRY_D_HASH_PPREV,
        "dentry",
        "d_hash.pprev",
    ),
    (abi::GLOBAL_OFF_TASK_NSPROXY, "task_struct", "nsproxy"),
    (abi::GLOBAL_OFF_NSPROXY_MNT_NS, "nsproxy", "mnt_ns"),
    (abi::GLOBAL_OFF_MNT_NS_INUM, "mnt_namespace", "ns.inum"),
    (abi::GLOBAL_OFF_TASK_FS, "task_struct", "fs"),
    (abi::GLOBAL_OFF_FS_ROOT, "fs_struct", "root"),
    (abi::GLOBAL_OFF_DENTRY_D_INODE, "dentry", "d_inode"),
    (abi::GLOBAL_OFF_DENTRY_D_SB, "dentry", "d_sb"),
    (
        abi::GLOBAL_OFF_TASK_TI_STATUS,
        "task_struct",
        "thread_info.status",
    ),
    (abi::GLOBAL_OFF_SOCKET_SK, "socket", "sk"),
    (
        abi::GLOBAL_OFF_SOCK_FAMILY,
        "sock",
        "__sk_common.skc_family",
    ),
    (abi::GLOBAL_OFF_REGS_DI, "pt_regs", "di"),
    (abi::GLOBAL_OFF_REGS_SI, "pt_regs", "si"),
    (abi::GLOBAL_OFF_REGS_DX, "pt_regs", "dx"),
    (abi::GLOBAL_OFF_REGS_ORIG_AX, "pt_regs", "orig_ax"),
    (abi::GLOBAL_OFF_TASK_FILES, "task_struct", "files"),
    (abi::GLOBAL_OFF_FILES_FDT, "files_struct", "fdt"),
    (abi::GLOBAL_OFF_FDT_FD, "fdtable", "fd"),
    (abi::GLOBAL_OFF_FDT_MAX_FDS, "fdtable", "max_fds"),
    (abi::GLOBAL_OFF_TASK_TGID, "task_struct", "tgid"),
    (abi::GLOBAL_OFF_CGROUP_KN, "cgroup", "kn"),
    (abi::GLOBAL_OFF_CGROUP_PARENT, "cgroup", "self.parent"),
    (abi::GLOBAL_OFF_KERNFS_NODE_ID, "kernfs_node", "id"),
    (abi::GLOBAL_OFF_CGROUP_ROOT, "cgroup", "root"),
    (
        abi::GLOBAL_OFF_CGROUP_ROOT_HIERARCHY_ID,
        "cgroup_root",
        "hierarchy_id",
    ),
];

/// Resolve every offset; the error names the first member the kernel's BTF lacks.
pub fn resolve(btf: &KernelBtf) -> Result<Vec<(&'static str, u32)>, BtfError> {
    OFFSETS
        .iter()
        .map(|&(global, ty, member)| Ok((global, btf.offset(ty, member)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_offset_resolves_on_this_kernel() {
        let Ok(btf) = KernelBtf::from_sys() else {
            return;
        };
        let offs = resolve(&btf).expect("all members present");
        assert_eq!(offs.len(), OFFSETS.len());
    }
}
