#!/bin/sh
# dracut mount hook (sourced by dracut's init, before rootfs-block's own mount hook): mount the
# root device (root=) on $NEWROOT, then replace it with the current treeswap tree. A mount
# hook, not pre-pivot: dracut checks right after the mount hooks that $NEWROOT looks like an
# operating system, and the root device holds a state root, not one. switch_root later moves
# /run, with the state device mounted below it, into the new root.
. /usr/share/treeswap/treeswap-root.sh
if [ "$(ts_arg treeswap on)" != off ] && ! ismounted "$NEWROOT"; then
    _ts_rootdev=${root#block:}
    if [ -z "$_ts_rootdev" ]; then
        ts_say "error: no root= on the kernel command line"
    elif mount ${fstype:+-t "$fstype"} -o "${rflags:-ro}" "$_ts_rootdev" "$NEWROOT"; then
        treeswap_root "$NEWROOT" || ts_say "error: not booting from a treeswap tree"
    else
        ts_say "error: cannot mount the root device $_ts_rootdev"
    fi
fi
