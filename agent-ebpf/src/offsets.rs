//! Struct member offsets resolved by the agent from the running kernel's BTF and written into
//! `.rodata` at load time (aya freezes it, so the verifier sees constants and pointer arithmetic
//! on BTF pointers stays trusted). Rust eBPF has no CO-RE for field access; this is our CO-RE.
macro_rules! offsets {
    ($($name:ident),* $(,)?) => {
        $(
            #[unsafe(no_mangle)]
            static $name: u32 = 0;
        )*
        pub mod get {
            $(
                #[inline(always)]
                #[allow(non_snake_case)]
                pub fn $name() -> usize {
                    // SAFETY: read of a frozen global; volatile so LLVM does not fold the 0.
                    unsafe { core::ptr::read_volatile(&super::$name) as usize }
                }
            )*
        }
    };
}

offsets!(
    OFF_BPRM_FILE,
    OFF_BPRM_FILENAME,
    OFF_FILE_F_PATH,
    OFF_FILE_F_INODE,
    OFF_FILE_F_MODE,
    OFF_INODE_I_INO,
    OFF_INODE_I_SB,
    OFF_INODE_I_NLINK,
    OFF_SB_S_DEV,
    OFF_MSGHDR_MSG_NAME,
    OFF_SOCKET_TYPE,
    OFF_PATH_DENTRY,
    OFF_DENTRY_D_HASH_PPREV,
    OFF_TASK_NSPROXY,
    OFF_NSPROXY_MNT_NS,
    OFF_MNT_NS_INUM,
    OFF_CGROUP_KN,
    OFF_CGROUP_PARENT,
    OFF_KERNFS_NODE_ID,
    OFF_CGROUP_ROOT,
    OFF_CGROUP_ROOT_HIERARCHY_ID,
    OFF_TASK_FS,
    OFF_FS_ROOT,
    OFF_DENTRY_D_INODE,
    OFF_DENTRY_D_SB,
    OFF_TASK_TI_STATUS,
    OFF_SOCKET_SK,
    OFF_SOCK_FAMILY,
    OFF_REGS_DI,
    OFF_REGS_SI,
    OFF_REGS_DX,
    OFF_REGS_ORIG_AX,
    OFF_TASK_FILES,
    OFF_FILES_FDT,
    OFF_FDT_FD,
    OFF_FDT_MAX_FDS,
    OFF_TASK_TGID,
    HOST_MNTNS,
    HOST_ROOT_DEV,
    BACKSTOP,
);

/// Inode number of the host's root directory (64-bit, so not in the `u32` offset table).
#[unsafe(no_mangle)]
static HOST_ROOT_INO: u64 = 0;

#[inline(always)]
pub fn host_root_ino() -> u64 {
    // SAFETY: read of a frozen global.
    unsafe { core::ptr::read_volatile(&HOST_ROOT_INO) }
}

/// Read a `T` at `base + off` from kernel memory.
#[inline(always)]
pub unsafe fn read<T>(base: *const u8, off: usize) -> Result<T, i64> {
    unsafe {
        aya_ebpf::helpers::bpf_probe_read_kernel(base.add(off) as *const T).map_err(|e| e as i64)
    }
}
