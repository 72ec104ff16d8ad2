package conformance

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// NetnsDir is where `ip netns` keeps its named namespaces.
const NetnsDir = "/var/run/netns"

// NetnsPath returns the path of the named network namespace.
func NetnsPath(name string) string { return filepath.Join(NetnsDir, name) }

// randomSuffix returns n random bytes in hex, to make names unique across concurrent runs.
func randomSuffix(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		// crypto/rand does not fail on Linux; a clock-based suffix still keeps names apart.
		return fmt.Sprintf("%x", time.Now().UnixNano())[:2*n]
	}
	return hex.EncodeToString(b)
}

// NewNetns creates a network namespace named prefix plus a random suffix, with loopback up, and
// registers its deletion with env. It returns the name.
func NewNetns(ctx context.Context, env Env, prefix string) (string, error) {
	name := prefix + randomSuffix(5)
	if _, err := run(ctx, "ip", "netns", "add", name); err != nil {
		return "", err
	}
	env.Cleanup(func() {
		if err := DeleteNetns(name); err != nil {
			env.Logf("cleanup: %v", err)
		}
	})
	if _, err := run(ctx, "ip", "-n", name, "link", "set", "lo", "up"); err != nil {
		return "", err
	}
	return name, nil
}

// DeleteNetns removes a named network namespace; one that is already gone is not an error.
func DeleteNetns(name string) error {
	if _, err := os.Stat(NetnsPath(name)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	_, err := run(context.Background(), "ip", "netns", "del", name)
	return err
}

// ListNetns returns the names of the network namespaces that start with prefix.
func ListNetns(prefix string) ([]string, error) {
	entries, err := os.ReadDir(NetnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			names = append(names, e.Name())
		}
	}
	return names, nil
}

// Exec runs argv inside the named network namespace (`ip netns exec`) and returns its stdout.
// A failure carries the exit status and stderr. Killing on ctx cancellation reaches the whole
// process group.
func Exec(ctx context.Context, netns string, argv ...string) ([]byte, error) {
	return run(ctx, "ip", append([]string{"netns", "exec", netns}, argv...)...)
}

func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

// DialIn connects from inside the network namespace at nsPath. The socket belongs to that
// namespace for its whole life, so the connection can be used from any goroutine afterwards.
func DialIn(ctx context.Context, nsPath, network, address string) (net.Conn, error) {
	var conn net.Conn
	err := ns.WithNetNSPath(nsPath, func(ns.NetNS) error {
		// An IP literal dials on this goroutine, which ns keeps locked to the namespaced thread.
		var d net.Dialer
		c, err := d.DialContext(ctx, network, address)
		conn = c
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dial %s %s in %s: %w", network, address, nsPath, err)
	}
	return conn, nil
}

// Process is a long-running program started in a network namespace, with stdout and stderr
// going to a file. It runs in its own process group, which Stop and Kill signal as a whole.
type Process struct {
	Name    string
	LogPath string

	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
	err  error
}

// StartProcess starts argv in netns (`ip netns exec`), logging to dir/name.log (appended, so a
// restarted program keeps one history), and registers a Kill with env.
func StartProcess(env Env, dir, name, netns string, argv ...string) (*Process, error) {
	logPath := filepath.Join(dir, name+".log")
	f, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", logPath, err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", netns}, argv...)...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("starting %s in %s: %w", strings.Join(argv, " "), netns, err)
	}
	p := &Process{Name: name, LogPath: logPath, cmd: cmd, log: f, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		f.Close()
		close(p.done)
	}()
	env.Cleanup(func() {
		if err := p.Kill(); err != nil {
			env.Logf("cleanup: %v", err)
		}
	})
	return p, nil
}

// Pid returns the process id (`ip netns exec` execs the program, so it is the program's).
func (p *Process) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *Process) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited, and its wait error if so.
func (p *Process) Exited() (bool, error) {
	select {
	case <-p.done:
		return true, p.err
	default:
		return false, nil
	}
}

// Output returns what the process has written so far.
func (p *Process) Output() string {
	b, err := os.ReadFile(p.LogPath)
	if err != nil {
		return fmt.Sprintf("(reading %s: %v)", p.LogPath, err)
	}
	return string(b)
}

// Stop asks the process group to terminate (SIGTERM) and kills it if it is still there after
// grace. It waits for the process to exit. Stopping an exited process is a no-op.
func (p *Process) Stop(grace time.Duration) error {
	return p.signal(syscall.SIGTERM, grace)
}

// Kill kills the process group (SIGKILL) and waits for the process to exit.
func (p *Process) Kill() error {
	return p.signal(syscall.SIGKILL, 0)
}

// Signal sends sig to the process group without waiting; SIGINT to tcpdump, for instance.
func (p *Process) Signal(sig syscall.Signal) error {
	if done, _ := p.Exited(); done {
		return nil
	}
	if err := syscall.Kill(-p.Pid(), sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("signalling %s (pid %d): %w", p.Name, p.Pid(), err)
	}
	return nil
}

func (p *Process) signal(sig syscall.Signal, grace time.Duration) error {
	if err := p.Signal(sig); err != nil {
		return err
	}
	if grace > 0 {
		select {
		case <-p.done:
			return nil
		case <-time.After(grace):
		}
	}
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	<-p.done
	return nil
}
