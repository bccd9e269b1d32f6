"""POSIX probes for tests/fuse/test_posix.py: `python posix_probe.py DIR` runs about 65
operations in DIR (as root, some as nobody) and prints one line per probe: its result or its
errno, and for the timestamp probes which of m/c/a time changed. The test runs it on the local
disk and on a mount and compares the outputs line by line.
"""
import errno
import os
import socket
import stat
import sys
import time

root = sys.argv[1]
os.chdir(root)
out = []
def rec(name, fn):
    try:
        r = fn()
        out.append(f"{name}: ok {r!r}")
    except OSError as e:
        out.append(f"{name}: {errno.errorcode.get(e.errno, e.errno)}")
def st(p, follow=False):
    return os.stat(p) if follow else os.lstat(p)
def tick(): time.sleep(0.02)
def changed(p, fn, fields=("st_mtime_ns", "st_ctime_ns", "st_atime_ns")):
    a = st(p); tick(); fn(); b = st(p)
    return tuple(f[3] for f in fields if getattr(a, f) != getattr(b, f))  # m/c/a letters
os.umask(0o022)
open("f", "w").write("hello")
os.mkdir("d")
rec("create mode", lambda: oct(st("f").st_mode))
rec("mkdir mode", lambda: oct(st("d").st_mode))
rec("write times f", lambda: changed("f", lambda: open("f", "a").write("x")))
rec("write times dir", lambda: changed(".", lambda: open("f", "a").write("x")))
rec("truncate times", lambda: changed("f", lambda: os.truncate("f", 2)))
rec("truncate same size times", lambda: changed("f", lambda: os.truncate("f", 2)))
rec("open O_TRUNC times", lambda: changed("f", lambda: os.close(os.open("f", os.O_WRONLY | os.O_TRUNC))))
rec("chmod times", lambda: changed("f", lambda: os.chmod("f", 0o600)))
rec("chown same times", lambda: changed("f", lambda: os.chown("f", 0, 0)))
rec("link times f", lambda: changed("f", lambda: os.link("f", "g")))
rec("link times dir", lambda: changed(".", lambda: os.link("f", "g2")))
rec("nlink", lambda: st("f").st_nlink)
rec("unlink times f", lambda: changed("f", lambda: os.unlink("g")))
rec("rename times f", lambda: changed("f", lambda: os.rename("f", "f2")))
rec("rename back", lambda: os.rename("f2", "f"))
rec("rename times dir", lambda: changed(".", lambda: os.rename("g2", "g3")))
rec("mkdir times parent", lambda: changed(".", lambda: os.mkdir("e")))
rec("dir nlink", lambda: (st(".").st_nlink, st("d").st_nlink))
rec("rmdir times parent", lambda: changed(".", lambda: os.rmdir("e")))
rec("utime omit", lambda: os.utime("f", ns=(1_000_000_001, 2_000_000_002)) or (st("f").st_atime_ns, st("f").st_mtime_ns))
rec("utimensat now", lambda: os.utime("f") or abs(st("f").st_mtime_ns - time.time_ns()) < 5e9)
rec("symlink", lambda: os.symlink("f", "s") or (oct(st("s").st_mode), st("s").st_size, os.readlink("s")))
rec("symlink to missing", lambda: os.symlink("missing", "s2") or os.path.exists("s2"))
rec("open excl on symlink", lambda: os.open("s2", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
rec("open nofollow symlink", lambda: os.open("s", os.O_RDONLY | os.O_NOFOLLOW))
rec("lchown symlink", lambda: os.chown("s", 1, 1, follow_symlinks=False) or (st("s").st_uid, st("f").st_uid))
rec("mkfifo", lambda: os.mkfifo("p", 0o644) or oct(st("p").st_mode))
rec("mknod chr", lambda: os.mknod("c", 0o644 | stat.S_IFCHR, os.makedev(1, 3)) or (oct(st("c").st_mode), st("c").st_rdev))
rec("socket", lambda: socket.socket(socket.AF_UNIX).bind("sock") or oct(st("sock").st_mode))
rec("unlink dir", lambda: os.unlink("d"))
rec("rmdir file", lambda: os.rmdir("f"))
rec("rmdir nonempty", lambda: (open("d/x", "w").close(), os.rmdir("d")))
rec("rename dir into itself", lambda: os.rename("d", "d/sub"))
rec("rename file over dir", lambda: os.rename("f", "d"))
rec("rename dir over file", lambda: os.rename("d", "f"))
rec("rename to same", lambda: os.rename("f", "f") or os.path.exists("f"))
rec("link dir", lambda: os.link("d", "dl"))
rec("long name", lambda: open("x" * 256, "w"))
rec("255 name", lambda: open("y" * 255, "w").close() or len(os.listdir(".")) > 0)
rec("setgid dir", lambda: (os.chown("d", 0, 12), os.chmod("d", 0o2775), os.mkdir("d/sg"), open("d/sgf", "w").close(), oct(st("d/sg").st_mode), st("d/sg").st_gid, st("d/sgf").st_gid))
rec("chmod setuid then chown clears", lambda: (os.chmod("f", 0o4755), os.chown("f", 1, 1), oct(st("f").st_mode))[-1])
rec("sticky", lambda: (os.chmod("d", 0o1777), oct(st("d").st_mode))[-1])
rec("truncate bigger zero fill", lambda: (os.truncate("f", 10), open("f", "rb").read())[-1])
rec("pwrite past end", lambda: (fd2 := os.open("f", os.O_RDWR), os.pwrite(fd2, b"Z", 20), os.close(fd2), open("f", "rb").read())[-1])
rec("O_APPEND", lambda: (fd := os.open("f", os.O_WRONLY | os.O_APPEND), os.lseek(fd, 0, 0), os.write(fd, b"A"), os.close(fd), open("f", "rb").read()[-1:])[-1])
rec("readdir", lambda: sorted(os.listdir("d")))
rec("statvfs namemax", lambda: os.statvfs(".").f_namemax)
rec("xattr user", lambda: (os.setxattr("f", "user.k", b"v"), os.getxattr("f", "user.k"), sorted(os.listxattr("f")))[1:])
rec("xattr missing", lambda: os.getxattr("f", "user.none"))
rec("xattr remove missing", lambda: os.removexattr("f", "user.none"))
rec("xattr create exists", lambda: os.setxattr("f", "user.k", b"w", os.XATTR_CREATE))
rec("xattr replace missing", lambda: os.setxattr("f", "user.z", b"w", os.XATTR_REPLACE))
rec("xattr on symlink", lambda: os.setxattr("s", "user.k", b"v", follow_symlinks=False))
rec("xattr times", lambda: changed("f", lambda: os.setxattr("f", "user.t", b"1")))
def as_nobody(fn):
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([]); os.setresgid(65534, 65534, 65534); os.setresuid(65534, 65534, 65534)
            fn(); os._exit(0)
        except OSError as e:
            os._exit(100 + e.errno)
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return "ok" if code == 0 else errno.errorcode.get(code - 100, code)
os.chmod(".", 0o777)
open("rootfile", "w").close(); os.chmod("rootfile", 0o644)
rec("nobody chmod root file", lambda: as_nobody(lambda: os.chmod("rootfile", 0o777)))
rec("nobody write root file", lambda: as_nobody(lambda: open("rootfile", "w")))
rec("nobody read root file", lambda: as_nobody(lambda: open("rootfile").read()))
rec("nobody utime now root file", lambda: as_nobody(lambda: os.utime("rootfile")))
rec("nobody utime set root file", lambda: as_nobody(lambda: os.utime("rootfile", (1, 1))))
rec("nobody create", lambda: as_nobody(lambda: open("nob", "w").close()))
rec("nobody file owner", lambda: (st("nob").st_uid, st("nob").st_gid))
rec("nobody sticky unlink root file", lambda: (os.chmod(".", 0o1777), as_nobody(lambda: os.unlink("rootfile")))[-1])
rec("nobody chown own file", lambda: as_nobody(lambda: os.chown("nob", 0, 0)))
rec("nobody chgrp own file to own group", lambda: as_nobody(lambda: os.chown("nob", -1, 65534)))
rec("suid write by other clears", lambda: (os.chmod(".", 0o777), open("sx", "w").close(), os.chmod("sx", 0o4777), as_nobody(lambda: open("sx", "a").write("x")), oct(st("sx").st_mode))[-1])
print("\n".join(out))
