package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// The host paths a run changes. The DaemonSet's hostPath volumes name the CNI dirs, so the
// cluster's containerd must use them too; meshlessd's state and socket dirs are hostPaths as well.
// Each is moved aside before the run and moved back after it, byte for byte.
var hostDirs = []string{"/etc/cni/net.d", "/opt/cni/bin", "/var/lib/meshless", "/var/run/meshless"}

// runtimeDirs are where containerd, libcni and the kubelet create dirs whatever their
// configuration says (shim sockets, the CNI result cache, the device plugin socket, container log
// links). Those that did not exist before a run are removed after it.
var runtimeDirs = []string{"/run/containerd", cniCacheDir, "/var/lib/kubelet", "/var/log/containers"}

// cniCacheDir is libcni's default cache dir, which containerd 1.6 does not configure.
const cniCacheDir = "/var/lib/cni"

// kernelSysctls are the host-wide settings the kubelet rewrites at start (its "kernel
// tunables"); the run restores them.
var kernelSysctls = []string{
	"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes",
}

const (
	// lockPath serializes runs: two clusters cannot share the host's CNI dirs.
	lockPath = "/run/lock/meshless-e2e-k8s.lock"
	// journalPath records what a run changed on the host, so that a run killed before its
	// teardown is undone by the next one. It lives on disk: moved-aside dirs outlive a reboot.
	journalPath = "/var/lib/meshless-e2e-k8s/journal.json"
	netnsDir    = "/var/run/netns"
	cgroupFS    = "/sys/fs/cgroup"
	// backupSuffix names a moved-aside host dir, beside it (same file system, so rename works).
	backupSuffix = ".meshless-e2e-k8s-backup"
)

// journal is what a run changed on the host.
type journal struct {
	Netns      string     `json:"netns"`
	Dir        string     `json:"dir"`
	CgroupRoot string     `json:"cgroup_root"`
	NetName    string     `json:"cni_network"`
	Saved      []savedDir `json:"saved_dirs"`
	// Sysctls holds the values before the run, by path under /proc/sys.
	Sysctls map[string]string `json:"sysctls"`
	// Absent lists the runtimeDirs that did not exist before the run.
	Absent []string `json:"absent_dirs,omitempty"`
	// RootMadeShared is set when the run made the root mount shared (and must make it private
	// again).
	RootMadeShared bool `json:"root_made_shared,omitempty"`
}

// savedDir is one host dir moved aside: Backup is where it went ("" when it did not exist), and
// Created lists the dirs the run created for it (Path and missing parents, deepest first).
type savedDir struct {
	Path    string   `json:"path"`
	Backup  string   `json:"backup,omitempty"`
	Created []string `json:"created,omitempty"`
	// Parent is Path's nearest existing ancestor, whose entries the run changes (renames,
	// mkdirs); ParentMtime is its modification time before, in Unix nanoseconds.
	Parent      string `json:"parent,omitempty"`
	ParentMtime int64  `json:"parent_mtime,omitempty"`
}

func (j *journal) netnsPath() string { return filepath.Join(netnsDir, j.Netns) }

func writeJournal(j *journal) error {
	if err := os.MkdirAll(filepath.Dir(journalPath), 0o700); err != nil {
		return err
	}
	data, err := json.MarshalIndent(j, "", "  ")
	if err != nil {
		return err
	}
	tmp := journalPath + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, journalPath)
}

func readJournal() (*journal, error) {
	data, err := os.ReadFile(journalPath)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var j journal
	if err := json.Unmarshal(data, &j); err != nil {
		return nil, fmt.Errorf("journal %s: %w", journalPath, err)
	}
	return &j, nil
}

// lockHost takes the run lock without waiting: a second run refuses to start.
func lockHost() (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(lockPath), 0o755); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(lockPath, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("another e2e-k8s run holds %s: %w", lockPath, err)
	}
	return f, nil
}

// saveDir moves path aside (if it exists) and leaves an empty dir in its place.
func saveDir(path string) (savedDir, error) {
	s := savedDir{Path: path, Parent: filepath.Dir(path)}
	for s.Parent != "/" {
		if _, err := os.Lstat(s.Parent); err == nil {
			break
		}
		s.Parent = filepath.Dir(s.Parent)
	}
	if fi, err := os.Stat(s.Parent); err == nil {
		s.ParentMtime = fi.ModTime().UnixNano()
	}
	if _, err := os.Lstat(path); err == nil {
		s.Backup = path + backupSuffix
		if _, err := os.Lstat(s.Backup); err == nil {
			return s, fmt.Errorf("%s already exists: a backup of an earlier run? restore it by hand", s.Backup)
		}
		if err := os.Rename(path, s.Backup); err != nil {
			return s, err
		}
	}
	// The dirs to create, outermost first; recorded deepest first for removal.
	var missing []string
	for d := path; ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil || d == "/" {
			break
		}
		missing = append(missing, d)
	}
	s.Created = missing
	for i := len(missing) - 1; i >= 0; i-- {
		if err := os.Mkdir(missing[i], 0o755); err != nil {
			return s, err
		}
	}
	return s, nil
}

// restoreDir undoes saveDir: the run's dir goes, the original comes back by rename (contents,
// modes and times untouched), and parents the run created are removed.
func restoreDir(s savedDir) error {
	if err := os.RemoveAll(s.Path); err != nil {
		return err
	}
	if s.Backup != "" {
		if err := os.Rename(s.Backup, s.Path); err != nil {
			return err
		}
	}
	for _, d := range s.Created {
		if d == s.Path {
			continue
		}
		if err := os.Remove(d); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if s.ParentMtime != 0 {
		t := time.Unix(0, s.ParentMtime)
		return os.Chtimes(s.Parent, t, t)
	}
	return nil
}

func readSysctl(name string) (string, error) {
	b, err := os.ReadFile(filepath.Join("/proc/sys", name))
	return strings.TrimSpace(string(b)), err
}

func writeSysctl(name, value string) error {
	return os.WriteFile(filepath.Join("/proc/sys", name), []byte(value+"\n"), 0o644)
}

// cgroupHierarchies returns the mounted cgroup hierarchies (v1 controllers, name=systemd and
// the unified v2 tree of a hybrid host).
func cgroupHierarchies() ([]string, error) {
	entries, err := os.ReadDir(cgroupFS)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		p := filepath.Join(cgroupFS, e.Name())
		if _, err := os.Stat(filepath.Join(p, "cgroup.procs")); err == nil {
			out = append(out, p)
		}
	}
	return out, nil
}

// createCgroupRoot makes the kubelet's --cgroup-root in every hierarchy. cpuset children start
// with no CPUs and no memory nodes; they get the root's.
func createCgroupRoot(root string) error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		d := filepath.Join(h, root)
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
		for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
			v, err := os.ReadFile(filepath.Join(h, f))
			if err != nil {
				continue // not the cpuset hierarchy
			}
			if err := os.WriteFile(filepath.Join(d, f), v, 0o644); err != nil {
				return fmt.Errorf("%s: %w", filepath.Join(d, f), err)
			}
		}
	}
	return nil
}

// cgroupPids returns the processes in the cgroup tree root, in every hierarchy.
func cgroupPids(root string) map[int]bool {
	pids := map[int]bool{}
	hs, _ := cgroupHierarchies()
	for _, h := range hs {
		_ = filepath.WalkDir(filepath.Join(h, root), func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			data, _ := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			for _, f := range strings.Fields(string(data)) {
				if pid, err := strconv.Atoi(f); err == nil {
					pids[pid] = true
				}
			}
			return nil
		})
	}
	return pids
}

// removeCgroupRoot removes the tree root in every hierarchy, deepest first. It fails while a
// process is still inside.
func removeCgroupRoot(root string) error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	var errs []error
	for _, h := range hs {
		var dirs []string
		_ = filepath.WalkDir(filepath.Join(h, root), func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// nsInode returns the inode of a network namespace file (a /var/run/netns bind mount or
// /proc/PID/ns/net): two paths with one inode are one namespace.
func nsInode(path string) (uint64, bool) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, false
	}
	return st.Ino, true
}

// netnsPids returns the processes whose network namespace is the one with inode ino.
func netnsPids(ino uint64) map[int]bool {
	pids := map[int]bool{}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		if i, ok := nsInode(fmt.Sprintf("/proc/%d/ns/net", pid)); ok && i == ino {
			pids[pid] = true
		}
	}
	return pids
}

// rootShared reports whether the root mount has shared propagation (a "shared:N" optional field
// in mountinfo).
func rootShared() (bool, error) {
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 7 || fields[4] != "/" {
			continue
		}
		for _, f := range fields[6:] {
			if f == "-" {
				break
			}
			if strings.HasPrefix(f, "shared:") {
				return true, nil
			}
		}
		return false, nil
	}
	return false, errors.New("no root mount in /proc/self/mountinfo")
}

// mountsUnder returns the mount points at or below dir, deepest (last mounted) first.
func mountsUnder(dir string) ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	slices.Reverse(out)
	return out, sc.Err()
}

// unescapeMount decodes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func unmountAll(dir string) error {
	mps, err := mountsUnder(dir)
	if err != nil {
		return err
	}
	var errs []error
	for _, mp := range mps {
		if err := syscall.Unmount(mp, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
			errs = append(errs, fmt.Errorf("umount %s: %w", mp, err))
		}
	}
	return errors.Join(errs...)
}

// setupHost prepares the host for the inner run and records every change in j (written to the
// journal before the change is made, so that an interruption at any point can be undone).
func setupHost(ctx context.Context, j *journal, conflist []byte) error {
	if err := writeJournal(j); err != nil {
		return err
	}
	if err := os.MkdirAll(j.Dir, 0o755); err != nil {
		return err
	}
	for _, d := range runtimeDirs {
		if _, err := os.Lstat(d); errors.Is(err, os.ErrNotExist) {
			j.Absent = append(j.Absent, d)
		}
	}
	j.Sysctls = map[string]string{}
	for _, name := range kernelSysctls {
		if v, err := readSysctl(name); err == nil {
			j.Sysctls[name] = v
		}
	}
	for _, d := range hostDirs {
		s, err := saveDir(d)
		j.Saved = append(j.Saved, s)
		if werr := writeJournal(j); werr != nil {
			return errors.Join(err, werr)
		}
		if err != nil {
			return fmt.Errorf("moving %s aside: %w", d, err)
		}
	}
	// The DaemonSet mounts /var/run/netns with HostToContainer propagation, which the runtime
	// allows only from a shared or slave mount. systemd makes / shared on every node; this
	// machine has no systemd and / is private, so the run does what systemd would.
	shared, err := rootShared()
	if err != nil {
		return err
	}
	if !shared {
		j.RootMadeShared = true
		if err := writeJournal(j); err != nil {
			return err
		}
		if err := syscall.Mount("", "/", "", syscall.MS_SHARED, ""); err != nil {
			return fmt.Errorf("making / a shared mount: %w", err)
		}
	}
	if err := createCgroupRoot(j.CgroupRoot); err != nil {
		return fmt.Errorf("cgroup root %s: %w", j.CgroupRoot, err)
	}
	// The primary CNI: Debian's reference plugins, where the DaemonSet's hostPath expects them.
	for _, p := range []string{"bridge", "host-local", "loopback", "portmap"} {
		if err := copyFile(filepath.Join(debianCNIDir, p), filepath.Join("/opt/cni/bin", p), 0o755); err != nil {
			return fmt.Errorf("installing the %s CNI plugin: %w", p, err)
		}
	}
	if err := os.WriteFile(filepath.Join("/etc/cni/net.d", conflistName), conflist, 0o644); err != nil {
		return err
	}
	// The node's network: its own namespace, with the node address on an interface that is not
	// loopback (the kubelet refuses a loopback node IP) and a default route so that nothing looks
	// for one. A veth pair with both ends inside: the kernel here has no dummy driver.
	ns := j.Netns
	for _, argv := range [][]string{
		{"ip", "netns", "add", ns},
		{"ip", "-n", ns, "link", "set", "lo", "up"},
		{"ip", "-n", ns, "link", "add", nodeIface, "type", "veth", "peer", "name", nodeIface + "p"},
		{"ip", "-n", ns, "addr", "add", nodeIP + "/24", "dev", nodeIface},
		{"ip", "-n", ns, "link", "set", nodeIface + "p", "up"},
		{"ip", "-n", ns, "link", "set", nodeIface, "up"},
		{"ip", "-n", ns, "route", "add", "default", "dev", nodeIface},
	} {
		if out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, out)
		}
	}
	return nil
}

func copyFile(src, dst string, mode os.FileMode) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, data, mode)
}

// teardownHost undoes everything j records, whatever state the run left: it kills the cluster's
// processes (containers by cgroup, daemons and shims by network namespace), removes the pods'
// namespaces and every mount under the run dir, then restores the host. It goes on past errors
// and returns them all.
func teardownHost(j *journal, logf func(string, ...any)) error {
	var errs []error
	fail := func(what string, err error) {
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", what, err))
		}
	}
	nodeIno, haveNode := nsInode(j.netnsPath())
	// Pods' namespaces: those of the processes in the cluster's cgroups, found before they die.
	podNetns := map[uint64]bool{}
	for attempt := 0; ; attempt++ {
		pids := map[int]bool{}
		if j.CgroupRoot != "" {
			pids = cgroupPids(j.CgroupRoot)
		}
		for pid := range pids {
			if ino, ok := nsInode(fmt.Sprintf("/proc/%d/ns/net", pid)); ok && (!haveNode || ino != nodeIno) {
				podNetns[ino] = true
			}
		}
		if haveNode {
			for pid := range netnsPids(nodeIno) {
				pids[pid] = true
			}
		}
		if len(pids) == 0 {
			break
		}
		if attempt == 0 {
			logf("teardown: killing %d leftover processes of the cluster", len(pids))
		}
		if attempt == 100 {
			fail("killing the cluster's processes", fmt.Errorf("%d still alive after 10s", len(pids)))
			break
		}
		for pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if entries, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range entries {
			p := filepath.Join(netnsDir, e.Name())
			if ino, ok := nsInode(p); ok && podNetns[ino] && strings.HasPrefix(e.Name(), "cni-") {
				logf("teardown: removing the pod network namespace %s", p)
				_ = syscall.Unmount(p, syscall.MNT_DETACH)
				fail("removing "+p, os.Remove(p))
			}
		}
	}
	if j.Dir != "" {
		fail("unmounting under "+j.Dir, unmountAll(j.Dir))
	}
	if j.CgroupRoot != "" {
		fail("removing the cgroup root", removeCgroupRoot(j.CgroupRoot))
	}
	if j.RootMadeShared {
		fail("making / private again", syscall.Mount("", "/", "", syscall.MS_PRIVATE, ""))
	}
	for name, v := range j.Sysctls {
		if cur, err := readSysctl(name); err == nil && cur != v {
			fail("restoring "+name, writeSysctl(name, v))
		}
	}
	for i := len(j.Saved) - 1; i >= 0; i-- {
		fail("restoring "+j.Saved[i].Path, restoreDir(j.Saved[i]))
	}
	if j.Dir != "" {
		fail("removing container log links", removeLinksInto("/var/log/containers", j.Dir))
	}
	// libcni's cache of results (containerd keeps the default cache dir), by network name: ours,
	// and containerd's own loopback network when the cache did not exist before the run (its
	// entries are the run's; normally containerd removes them with each pod).
	var cached []string
	if j.NetName != "" {
		cached, _ = filepath.Glob(filepath.Join(cniCacheDir, "results", j.NetName+"-*"))
	}
	if slices.Contains(j.Absent, cniCacheDir) {
		loopback, _ := filepath.Glob(filepath.Join(cniCacheDir, "results", "cni-loopback-*"))
		cached = append(cached, loopback...)
	}
	for _, m := range cached {
		fail("removing "+m, os.Remove(m))
	}
	for _, d := range j.Absent {
		fail("removing "+d, removeRuntimeTree(d))
	}
	if j.Netns != "" {
		if _, err := os.Stat(j.netnsPath()); err == nil {
			if out, err := exec.Command("ip", "netns", "del", j.Netns).CombinedOutput(); err != nil {
				fail("deleting the netns "+j.Netns, fmt.Errorf("%w: %s", err, out))
			}
		}
	}
	if j.Dir != "" {
		// Never remove through a mount: a bind mount left under the run dir could be a host dir.
		if mps, err := mountsUnder(j.Dir); err != nil || len(mps) > 0 {
			fail("removing "+j.Dir, fmt.Errorf("still mounted under it: %v %v", mps, err))
		} else {
			fail("removing "+j.Dir, os.RemoveAll(j.Dir))
		}
	}
	if len(errs) == 0 {
		fail("removing the journal", os.Remove(journalPath))
		_ = os.Remove(filepath.Dir(journalPath)) // only when empty
	}
	return errors.Join(errs...)
}

// removeRuntimeTree removes a dir the run's runtime created: its sockets, links and empty dirs.
// A regular file in it was not expected: it is left, and reported.
func removeRuntimeTree(dir string) error {
	var paths []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		paths = append(paths, p)
		return nil
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var kept []string
	for i := len(paths) - 1; i >= 0; i-- {
		fi, err := os.Lstat(paths[i])
		if err != nil {
			continue
		}
		if fi.Mode().IsRegular() {
			kept = append(kept, paths[i])
			continue
		}
		if err := os.Remove(paths[i]); err != nil && !fi.IsDir() {
			return err
		}
	}
	if len(kept) > 0 {
		return fmt.Errorf("left files the run did not expect: %v", kept)
	}
	return nil
}

// removeLinksInto removes the symbolic links in dir that point below target (the kubelet's
// /var/log/containers links to the pods' logs).
func removeLinksInto(dir, target string) error {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range entries {
		p := filepath.Join(dir, e.Name())
		if t, err := os.Readlink(p); err == nil && strings.HasPrefix(t, target+"/") {
			if err := os.Remove(p); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
