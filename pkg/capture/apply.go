package capture

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/coreos/go-iptables/iptables"
)

// lockWaitSeconds bounds how long an iptables command waits for the xtables lock (legacy), so a
// stuck holder fails the CNI call with an error instead of hanging it.
const lockWaitSeconds = 30

// sbinDirs are searched after PATH: container runtimes may run plugins with a PATH lacking them.
var sbinDirs = []string{"/usr/sbin", "/sbin", "/usr/local/sbin"}

// lookTool finds an iptables program by name; its error wraps exec.ErrNotFound.
func lookTool(name string) (string, error) {
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	for _, dir := range sbinDirs {
		if p, err := exec.LookPath(dir + "/" + name); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: %w (nor in %s; is the iptables package installed?)",
		name, exec.ErrNotFound, strings.Join(sbinDirs, ", "))
}

// toolName returns the program of a backend and family, e.g. ip6tables-nft or iptables-legacy-restore.
func toolName(b Backend, family int, suffix string) string {
	prefix := "iptables"
	if family == 6 {
		prefix = "ip6tables"
	}
	return prefix + "-" + string(b) + suffix
}

// familyTools finds the programs of one family. The restore program, which every Apply and
// Remove runs, is found up front, so that a missing backend fails before the pod's netns is
// touched; the others only when needed, since searching PATH costs a fraction of a millisecond
// per program and a new pod's ADD needs only the restore program.
type familyTools struct {
	backend Backend
	family  int
	restore string
}

func resolveTools(b Backend, families []int) ([]familyTools, error) {
	var out []familyTools
	for _, f := range families {
		t := familyTools{backend: b, family: f}
		var err error
		if t.restore, err = t.find("-restore"); err != nil {
			return nil, err
		}
		out = append(out, t)
	}
	return out, nil
}

// find returns the path of the family's program with the given suffix ("", "-save", "-restore").
func (t familyTools) find(suffix string) (string, error) {
	p, err := lookTool(toolName(t.backend, t.family, suffix))
	if err != nil {
		return "", fmt.Errorf("iptables backend %s: %w", t.backend, err)
	}
	return p, nil
}

// handle returns a go-iptables handle on the backend's program. It runs the program (for its
// version), so it is called inside the netns closure like every other iptables command.
func (t familyTools) handle() (*iptables.IPTables, error) {
	path, err := t.find("")
	if err != nil {
		return nil, err
	}
	proto := iptables.ProtocolIPv4
	if t.family == 6 {
		proto = iptables.ProtocolIPv6
	}
	ipt, err := iptables.New(iptables.IPFamily(proto), iptables.Path(path), iptables.Timeout(lockWaitSeconds))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return ipt, nil
}

// prepare validates c and returns it normalized, with the programs of each family it implies.
func prepare(c Config) (Config, []familyTools, error) {
	if err := c.Validate(); err != nil {
		return c, nil, fmt.Errorf("capture config: %w", err)
	}
	c = c.normalized()
	tools, err := resolveTools(c.Backend, c.families())
	return c, tools, err
}

// Apply installs the ruleset and the policy routing in the netns at nsPath. The chains of each
// family are written in one transaction (iptables-restore --noflush, or one nftables batch, see
// applyFamily) together with whichever jumps are missing, so a pod is never half captured and
// applying twice leaves exactly one copy of everything. Concurrent Apply calls on the same netns
// are not supported (the runtime serialises the CNI calls of one pod). The families are
// independent and go in side by side, and the policy routing beside them: a pod's ADD waits for
// the slowest, not for the sum.
func Apply(nsPath string, c Config) error {
	_, err := start(nsPath, c, known(c.NodeIPs)).Finish()
	return err
}

// StartOnNode starts Apply for a pod of the node whose netns the caller is in, with c.NodeIPs set
// to NodeAddrs(c.PodIPs), and returns once the restore programs run in a new pod's netns (in any
// other netns once the work has begun; with the nft backend, which needs no program for a new
// pod, at once); Finish waits for the outcome. Starting a program is most of its cost, and a
// caller with other work for the pod (the plugin's enrollment) does that work while the programs
// start, not while they are being started: on a small node both compete for the same cores. The
// node's addresses are read while the programs start.
func StartOnNode(nsPath string, c Config) *Installing {
	addrs := &nodeAddrs{done: make(chan struct{})}
	go func() {
		defer close(addrs.done)
		addrs.ips, addrs.err = NodeAddrs(c.PodIPs)
	}()
	return start(nsPath, c, addrs)
}

// Installing is a capture being installed.
type Installing struct {
	done  chan struct{}
	fresh bool
	err   error
}

// Finish waits until the capture is installed, or failed. fresh reports whether the netns held
// none of the tables of our chains in any of the pod's families before: then whatever of ours is
// there is this installation's doing, and Remove undoes just that.
func (in *Installing) Finish() (fresh bool, err error) {
	<-in.done
	return in.fresh, in.err
}

// nodeAddrs delivers the node's addresses to every family's goroutine once they are read.
type nodeAddrs struct {
	done chan struct{}
	ips  []netip.Addr
	err  error
}

func known(ips []netip.Addr) *nodeAddrs {
	n := &nodeAddrs{done: make(chan struct{}), ips: ips}
	close(n.done)
	return n
}

// config returns c with the node's addresses, once they are read.
func (n *nodeAddrs) config(c Config) (Config, error) {
	<-n.done
	if n.err != nil {
		return c, n.err
	}
	c.NodeIPs = n.ips
	if err := c.Validate(); err != nil {
		return c, fmt.Errorf("capture config: %w", err)
	}
	return c.normalized(), nil
}

// start installs the capture in the background and returns once every family has started its
// restore program, or begun the slower way (see applyWithPrograms), or failed; with the nft
// backend, at once.
func start(nsPath string, c Config, addrs *nodeAddrs) *Installing {
	in := &Installing{done: make(chan struct{})}
	c, tools, err := prepare(c)
	if err != nil {
		in.err = err
		close(in.done)
		return in
	}
	netns, err := ns.GetNS(nsPath)
	if err != nil {
		in.err = fmt.Errorf("install capture in netns %s: %w", nsPath, err)
		close(in.done)
		return in
	}
	errs := make([]error, len(tools)+1)
	freshes := make([]bool, len(tools))
	var wg, started sync.WaitGroup
	started.Add(len(tools))
	for i, t := range tools {
		wg.Go(func() {
			once := sync.OnceFunc(started.Done)
			defer once() // when the netns cannot be entered
			freshes[i], errs[i] = applyFamily(netns, t, c, addrs, once)
		})
	}
	// The policy routing is a few rtnetlink requests, independent of the chains: it goes in
	// beside them.
	wg.Go(func() {
		errs[len(tools)] = netns.Do(func(ns.NetNS) error { return applyRouting(c.routedFamilies()) })
	})
	go func() {
		wg.Wait()
		_ = netns.Close()
		in.fresh = !slices.Contains(freshes, false)
		if err := errors.Join(errs...); err != nil {
			in.err = fmt.Errorf("install capture in netns %s: %w", nsPath, err)
		}
		close(in.done)
	}()
	if c.Backend == NFT {
		// A new pod's nft rules need no program (applyFamily), so there is no start to wait for,
		// and even scheduling the goroutines above takes a good part of a millisecond.
		return in
	}
	started.Wait()
	return in
}

// applyRouting puts in the policy routing of families, in the calling thread's netns. The route
// points at lo, which the kernel only accepts while lo is up.
func applyRouting(families []int) error {
	r, err := openRouting()
	if err != nil {
		return err
	}
	defer r.close()
	lo, err := r.prepareLoopback()
	if err != nil {
		return err
	}
	for _, f := range families {
		if err := r.apply(f, lo); err != nil {
			return err
		}
	}
	return nil
}

// applyFamily writes one family's chains and missing jumps into netns in one transaction. When
// the netns holds none of the tables they live in (a new pod's), every jump is missing, and with
// the nft backend the rules go in over netlink, with no program (writeNFT). Otherwise
// applyWithPrograms writes them. started is called once a program runs, or the slower way
// begins. fresh reports whether the netns held none of the tables.
func applyFamily(netns ns.NetNS, t familyTools, c Config, addrs *nodeAddrs, started func()) (fresh bool, err error) {
	if t.backend == NFT {
		if conn, err := nftIn(netns); err == nil {
			defer func() { _ = conn.CloseLasting() }()
			if fresh, err := nftHoldsNoTables(conn, t.family, tablesOf(chains(c, t.family))); err == nil && fresh {
				c, err := addrs.config(c)
				if err != nil {
					return true, err
				}
				return true, writeNFT(conn, chains(c, t.family), t.family)
			}
		}
	}
	// Programs started from this goroutine inherit its thread's netns.
	err = netns.Do(func(ns.NetNS) error {
		fresh, err = applyWithPrograms(t, c, addrs, started)
		return err
	})
	return fresh, err
}

// applyWithPrograms is applyFamily with iptables programs, in the calling thread's netns. Which
// jumps are missing it learns from the kernel when the netns holds none of the tables of our
// chains, and otherwise from one iptables-save. (Asking iptables about each jump instead costs a
// program run per question, and each run is milliseconds of a pod's CNI ADD.) In a new pod's
// netns the restore program starts at once and gets its input when the node's addresses are
// known: starting a program is most of its cost.
func applyWithPrograms(t familyTools, c Config, addrs *nodeAddrs, started func()) (fresh bool, err error) {
	if fresh, err := holdsNoTables(t.backend, t.family, tablesOf(chains(c, t.family))); err == nil && fresh {
		r, err := t.startRestore()
		started()
		if err != nil {
			return true, err
		}
		c, err := addrs.config(c)
		if err != nil {
			r.abort()
			return true, err
		}
		chs := chains(c, t.family)
		return true, r.wait(r.feed(restoreInput(chs, chs)))
	}
	started()
	saved, err := t.runSave()
	if err != nil {
		return false, err
	}
	if c, err = addrs.config(c); err != nil {
		return false, err
	}
	chs := chains(c, t.family)
	present := jumpsIn(saved)
	var missing []chain
	for _, ch := range chs {
		if !present[jumpKey{ch.table, ch.parent, ch.name}] {
			missing = append(missing, ch)
		}
	}
	return false, t.runRestore(restoreInput(chs, missing))
}

// runSave returns the family's iptables-save output.
func (t familyTools) runSave() ([]byte, error) {
	path, err := t.find("-save")
	if err != nil {
		return nil, err
	}
	var stderr bytes.Buffer
	save := exec.Command(path)
	save.Stderr = &stderr
	saved, err := save.Output()
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %s", path, err, strings.TrimSpace(stderr.String()))
	}
	return saved, nil
}

// runRestore applies input with iptables-restore --noflush, in one transaction per table.
func (t familyTools) runRestore(input string) error {
	r, err := t.startRestore()
	if err != nil {
		return err
	}
	return r.finish(input)
}

// restoreRun is an iptables-restore --noflush waiting for its input.
type restoreRun struct {
	path   string
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	stderr bytes.Buffer
}

func (t familyTools) startRestore() (*restoreRun, error) {
	r := &restoreRun{path: t.restore, cmd: exec.Command(t.restore, "--noflush", fmt.Sprintf("--wait=%d", lockWaitSeconds))}
	r.cmd.Stderr = &r.stderr
	var err error
	if r.stdin, err = r.cmd.StdinPipe(); err != nil {
		return nil, fmt.Errorf("%s: %w", t.restore, err)
	}
	if err := r.cmd.Start(); err != nil {
		return nil, fmt.Errorf("%s: %w", t.restore, err)
	}
	return r, nil
}

// finish hands the program its input, in one transaction per table, and waits for it.
func (r *restoreRun) finish(input string) error {
	return r.wait(r.feed(input))
}

// feed hands the program its input and closes it, without waiting for the program.
func (r *restoreRun) feed(input string) error {
	_, werr := io.WriteString(r.stdin, input)
	return errors.Join(werr, r.stdin.Close())
}

// wait waits for the program; feedErr is what feed returned.
func (r *restoreRun) wait(feedErr error) error {
	if err := r.cmd.Wait(); err != nil {
		return fmt.Errorf("%s --noflush: %w: %s", r.path, err, strings.TrimSpace(r.stderr.String()))
	}
	if feedErr != nil {
		return fmt.Errorf("%s --noflush: input: %w", r.path, feedErr)
	}
	return nil
}

// abort ends the program without input: it then changes nothing.
func (r *restoreRun) abort() {
	_ = r.stdin.Close()
	_ = r.cmd.Wait()
}

// jumpKey names a jump from a built-in chain of a table to one of our chains.
type jumpKey struct{ table, parent, target string }

// jumpsIn returns the jumps found in iptables-save output: "-A parent ... -j target" rules.
func jumpsIn(saved []byte) map[jumpKey]bool {
	out := make(map[jumpKey]bool)
	table := ""
	for _, line := range strings.Split(string(saved), "\n") {
		if name, ok := strings.CutPrefix(line, "*"); ok {
			table = strings.TrimSpace(name)
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "-A" {
			continue
		}
		for i := 2; i+1 < len(f); i++ {
			if f[i] == "-j" || f[i] == "--jump" {
				out[jumpKey{table, f[1], f[i+1]}] = true
			}
		}
	}
	return out
}

// Check verifies, in the netns at nsPath, that everything Apply installs for c is present and
// complete: each chain holds exactly its rules, each is entered by exactly one jump, and the
// policy rule and route exist. It reports every problem it finds.
func Check(nsPath string, c Config) error {
	c, tools, err := prepare(c)
	if err != nil {
		return err
	}
	var problems []error
	err = ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		r, err := openRouting()
		if err != nil {
			return err
		}
		defer r.close()
		for _, t := range tools {
			ps, err := checkFamily(t, c)
			if err != nil {
				return err
			}
			problems = append(problems, ps...)
		}
		for _, f := range c.routedFamilies() {
			ps, err := r.check(f)
			if err != nil {
				return err
			}
			problems = append(problems, ps...)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("check capture in netns %s: %w", nsPath, err)
	}
	if len(problems) > 0 {
		return fmt.Errorf("capture in netns %s is incomplete: %w", nsPath, errors.Join(problems...))
	}
	return nil
}

// LacksIPv6Refusal reports whether the pod in the netns at nsPath, which has the addresses podIPs,
// should have the IPv6 chains that refuse its TCP (a pod without an IPv6 address, see
// Config.families) but has not, as a pod that an earlier meshless-cni captured: its IPv6
// link-local address is then a way around the capture until the rules are applied again or the
// pod is recreated. A dual-stack pod is never reported: its link-local address is captured. It
// runs one ip6tables-save in the netns and looks for the jump into the outbound refusal.
func LacksIPv6Refusal(nsPath string, b Backend, podIPs []netip.Addr) (bool, error) {
	if (Config{PodIPs: podIPs}).hasIPv6() || !kernelHasIPv6() {
		return false, nil
	}
	var saved []byte
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		var err error
		saved, err = familyTools{backend: b, family: 6}.runSave()
		return err
	})
	if err != nil {
		return false, fmt.Errorf("look for the IPv6 refusal in netns %s: %w", nsPath, err)
	}
	return !jumpsIn(saved)[jumpKey{"filter", "OUTPUT", ChainOutbound}], nil
}

// checkFamily returns the problems found in one family's chains; err is for failures to look.
func checkFamily(t familyTools, c Config) (problems []error, err error) {
	ipt, err := t.handle()
	if err != nil {
		return nil, err
	}
	v := "IPv4"
	if t.family == 6 {
		v = "IPv6"
	}
	for _, ch := range chains(c, t.family) {
		where := fmt.Sprintf("%s %s chain %s", v, ch.table, ch.name)
		ok, err := ipt.ChainExists(ch.table, ch.name)
		if err != nil {
			return nil, fmt.Errorf("look for %s: %w", where, err)
		}
		if !ok {
			problems = append(problems, fmt.Errorf("%s is missing", where))
			continue
		}
		listed, err := ipt.List(ch.table, ch.name)
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", where, err)
		}
		if n := countAppends(listed, ""); n != len(ch.rules) {
			problems = append(problems, fmt.Errorf("%s holds %d rules, want %d", where, n, len(ch.rules)))
		}
		for _, r := range ch.rules {
			ok, err := ipt.Exists(ch.table, ch.name, r.spec()...)
			if err != nil {
				return nil, fmt.Errorf("look for rule %q in %s: %w", strings.Join(r.spec(), " "), where, err)
			}
			if !ok {
				problems = append(problems, fmt.Errorf("%s lacks rule %q", where, strings.Join(r.spec(), " ")))
			}
		}

		listed, err = ipt.List(ch.table, ch.parent)
		if err != nil {
			return nil, fmt.Errorf("list %s %s %s: %w", v, ch.table, ch.parent, err)
		}
		ok, err = ipt.Exists(ch.table, ch.parent, ch.jump.spec()...)
		if err != nil {
			return nil, fmt.Errorf("look for jump to %s: %w", where, err)
		}
		switch n := countAppends(listed, ch.name); {
		case !ok:
			problems = append(problems, fmt.Errorf("%s %s %s lacks the jump %q", v, ch.table, ch.parent, strings.Join(ch.jump.spec(), " ")))
		case n != 1:
			problems = append(problems, fmt.Errorf("%s %s %s jumps to %s %d times, want once", v, ch.table, ch.parent, ch.name, n))
		}
	}
	return problems, nil
}

// countAppends counts the rules in `iptables -S chain` output; with target set, only the rules
// jumping to it.
func countAppends(listed []string, target string) int {
	n := 0
	for _, line := range listed {
		f := strings.Fields(line)
		if len(f) < 2 || f[0] != "-A" {
			continue
		}
		if target == "" {
			n++
			continue
		}
		for i := 2; i+1 < len(f); i++ {
			if (f[i] == "-j" || f[i] == "-g") && f[i+1] == target {
				n++
				break
			}
		}
	}
	return n
}

// Remove deletes, in the netns at nsPath, what Apply installs for c: per family, the jumps and
// the chains in one transaction; then each family's policy rule and route. Missing pieces, and a
// netns that no longer exists, are not errors. Only the families c implies are touched, as in Apply.
func Remove(nsPath string, c Config) error {
	if c.Backend != Legacy && c.Backend != NFT {
		return fmt.Errorf("capture config: unknown iptables backend %q (want %q or %q)", c.Backend, Legacy, NFT)
	}
	c = c.normalized()
	tools, err := resolveTools(c.Backend, c.families())
	if err != nil {
		return err
	}
	var problems []error
	err = ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		for _, t := range tools {
			if err := removeFamily(t, c); err != nil {
				problems = append(problems, err)
			}
		}
		// The chains go even when the routing cannot be reached.
		r, err := openRouting()
		if err != nil {
			problems = append(problems, err)
			return nil
		}
		defer r.close()
		for _, f := range c.routedFamilies() {
			if err := r.remove(f); err != nil {
				problems = append(problems, err)
			}
		}
		return nil
	})
	if errors.As(err, new(ns.NSPathNotExistErr)) {
		return nil
	}
	if err == nil {
		err = errors.Join(problems...)
	}
	if err != nil {
		return fmt.Errorf("remove capture from netns %s: %w", nsPath, err)
	}
	return nil
}

// removeFamily deletes every jump to one of our chains and then the chains, in one
// iptables-restore transaction built from one iptables-save: two program runs, whatever there
// is to remove, and never a state with a jump to a chain that is gone.
func removeFamily(t familyTools, c Config) error {
	saved, err := t.runSave()
	if err != nil {
		return err
	}
	var names []string
	for _, ch := range chains(c, t.family) {
		names = append(names, ch.name)
	}
	input := removalInput(saved, names)
	if input == "" {
		return nil
	}
	return t.runRestore(input)
}

// removalInput returns the iptables-restore --noflush input that deletes, from the state that
// iptables-save output describes, every rule outside the named chains that jumps (or goes) to
// one of them, then flushes and deletes them; "" when none of them exists. The rules are
// deleted by their exact spec as saved, so duplicates someone added by hand go too.
func removalInput(saved []byte, names []string) string {
	type table struct {
		name   string
		dels   []string
		chains []string
	}
	var tables []*table
	var cur *table
	for _, line := range strings.Split(string(saved), "\n") {
		if name, ok := strings.CutPrefix(line, "*"); ok {
			cur = &table{name: strings.TrimSpace(name)}
			tables = append(tables, cur)
			continue
		}
		if cur == nil {
			continue
		}
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if name, ok := strings.CutPrefix(f[0], ":"); ok && slices.Contains(names, name) {
			cur.chains = append(cur.chains, name)
			continue
		}
		if len(f) < 2 || f[0] != "-A" || slices.Contains(names, f[1]) {
			continue
		}
		for i := 2; i+1 < len(f); i++ {
			if (f[i] == "-j" || f[i] == "--jump" || f[i] == "-g" || f[i] == "--goto") && slices.Contains(names, f[i+1]) {
				cur.dels = append(cur.dels, "-D"+strings.TrimPrefix(line, "-A"))
				break
			}
		}
	}
	var b strings.Builder
	for _, t := range tables {
		if len(t.dels) == 0 && len(t.chains) == 0 {
			continue
		}
		fmt.Fprintf(&b, "*%s\n", t.name)
		for _, d := range t.dels {
			b.WriteString(d + "\n")
		}
		for _, ch := range t.chains {
			fmt.Fprintf(&b, "-F %s\n-X %s\n", ch, ch)
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}
