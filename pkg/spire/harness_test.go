package spire

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The tests run a real spire-server and spire-agent, built by scripts/spire-binaries.sh (make test
// runs it first), on loopback with their state in a temporary directory.

const spireVersion = "v1.13.3"

// testTD is the trust domain of the test SPIRE deployment, the daemon's default.
var testTD = spiffeid.RequireTrustDomainFromString("cluster.local")

// delegateID is the SPIFFE ID the agent gives this test process (by its uid) and lists in
// authorized_delegates, as a deployment would for meshlessd.
var delegateID = spiffeid.RequireFromPath(testTD, "/meshlessd")

func spireBinary(t *testing.T, name string) string {
	t.Helper()
	dir := os.Getenv("MESHLESS_SPIRE_DIR")
	if dir == "" {
		dir = "/var/cache/meshless/spire-" + spireVersion
	}
	path := filepath.Join(dir, "bin", name)
	if _, err := os.Stat(path); err != nil {
		msg := fmt.Sprintf("%s not built (%v): run scripts/spire-binaries.sh", name, err)
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return path
}

// spireEnv is a SPIRE server and one attested agent.
type spireEnv struct {
	t          *testing.T
	dir        string
	server     string
	agent      string
	serverSock string
	adminSock  string
	agentSock  string
	agentConf  string
	agentID    spiffeid.ID
	agentCmd   *exec.Cmd
	agentDone  <-chan struct{}
}

// entry is a registration entry for the pods of one service account.
type entry struct {
	namespace, serviceAccount string
	// ttl is the X.509-SVID lifetime; zero keeps the server's default (1h).
	ttl time.Duration
}

func (e entry) id() spiffeid.ID {
	return spiffeid.RequireFromSegments(testTD, "ns", e.namespace, "sa", e.serviceAccount)
}

// startSPIRE starts a server (join-token node attestation, SQLite datastore), registers the test
// process as the agent's authorized delegate and the given entries, then starts the agent.
func startSPIRE(t *testing.T, entries ...entry) *spireEnv {
	t.Helper()
	e := &spireEnv{t: t, server: spireBinary(t, "spire-server"), agent: spireBinary(t, "spire-agent")}
	// Not t.TempDir: unix socket paths must stay under 108 bytes, and test names are long.
	dir, err := os.MkdirTemp("", "mlspire-")
	if err != nil {
		t.Fatal(err)
	}
	e.dir = dir
	t.Cleanup(func() { os.RemoveAll(dir) })
	e.serverSock = filepath.Join(dir, "server", "api.sock")
	// The agent refuses an admin socket in the directory of the Workload API socket.
	e.agentSock = filepath.Join(dir, "workload", "api.sock")
	e.adminSock = filepath.Join(dir, "admin", "admin.sock")
	for _, d := range []string{"server", "workload", "admin", "server-data", "agent-data"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}

	port := freePort(t)
	serverConf := filepath.Join(dir, "server.conf")
	writeFile(t, serverConf, fmt.Sprintf(`server {
    bind_address = "127.0.0.1"
    bind_port = "%d"
    socket_path = %q
    trust_domain = %q
    data_dir = %q
    log_level = "DEBUG"
    experimental {
        # Entries reach the agents within a second instead of five.
        cache_reload_interval = "1s"
    }
}
plugins {
    DataStore "sql" {
        plugin_data {
            database_type = "sqlite3"
            connection_string = %q
        }
    }
    NodeAttestor "join_token" {
        plugin_data {}
    }
    KeyManager "memory" {
        plugin_data {}
    }
}
`, port, e.serverSock, testTD.Name(), filepath.Join(dir, "server-data"), filepath.Join(dir, "server-data", "datastore.sqlite3")))
	e.daemon("spire-server", e.server, "run", "-config", serverConf)
	e.waitFor("spire-server healthy", func() bool {
		return exec.Command(e.server, "healthcheck", "-socketPath", e.serverSock).Run() == nil
	})

	out := e.serverCmd("token", "generate", "-ttl", "600")
	// The first line is "Token: <token>"; a warning about the missing -spiffeID may follow.
	first, _, _ := strings.Cut(out, "\n")
	token, ok := strings.CutPrefix(strings.TrimSpace(first), "Token: ")
	if !ok || spiffeid.ValidatePathSegment(token) != nil {
		t.Fatalf("token generate printed %q", out)
	}
	e.agentID = spiffeid.RequireFromPath(testTD, "/spire/agent/join_token/"+token)
	bundle := filepath.Join(dir, "bundle.pem")
	writeFile(t, bundle, e.serverCmd("bundle", "show"))

	e.serverCmd("entry", "create", "-parentID", e.agentID.String(), "-spiffeID", delegateID.String(),
		"-selector", fmt.Sprintf("unix:uid:%d", os.Getuid()))
	for _, en := range entries {
		e.createEntry(en)
	}

	e.agentConf = filepath.Join(dir, "agent.conf")
	writeFile(t, e.agentConf, fmt.Sprintf(`agent {
    data_dir = %q
    log_level = "DEBUG"
    server_address = "127.0.0.1"
    server_port = "%d"
    socket_path = %q
    admin_socket_path = %q
    trust_bundle_path = %q
    trust_domain = %q
    join_token = %q
    authorized_delegates = [%q]
    experimental {
        # Entries and rotations are picked up within a second instead of five.
        sync_interval = "1s"
    }
}
plugins {
    NodeAttestor "join_token" {
        plugin_data {}
    }
    # On disk so that a restarted agent keeps its SVID: a join token attests only once.
    KeyManager "disk" {
        plugin_data {
            directory = %q
        }
    }
    WorkloadAttestor "unix" {
        plugin_data {}
    }
}
`, filepath.Join(dir, "agent-data"), port, e.agentSock, e.adminSock, bundle, testTD.Name(), token, delegateID.String(),
		filepath.Join(dir, "agent-data")))
	e.startAgent()
	return e
}

// createEntry registers the pods of en's service account under the agent.
func (e *spireEnv) createEntry(en entry) {
	e.t.Helper()
	args := []string{"entry", "create", "-parentID", e.agentID.String(), "-spiffeID", en.id().String(),
		"-selector", "k8s:ns:" + en.namespace, "-selector", "k8s:sa:" + en.serviceAccount}
	if en.ttl > 0 {
		args = append(args, "-x509SVIDTTL", fmt.Sprint(int(en.ttl.Seconds())))
	}
	e.serverCmd(args...)
}

// startAgent starts the agent and waits until it has synced the entries: until it gives this
// process, the delegate, its SVID over the Workload API.
func (e *spireEnv) startAgent() {
	e.t.Helper()
	e.agentCmd, e.agentDone = e.daemon("spire-agent", e.agent, "run", "-config", e.agentConf)
	done := e.agentDone
	e.waitFor("spire-agent serving the delegate's SVID", func() bool {
		select {
		case <-done:
			e.t.Fatal("spire-agent exited")
		default:
		}
		return exec.Command(e.agent, "api", "fetch", "x509", "-socketPath", e.agentSock, "-timeout", "2s").Run() == nil
	})
}

// killAgent makes the agent go away as a crash would: no chance to close its streams.
func (e *spireEnv) killAgent() {
	e.t.Helper()
	e.agentCmd.Process.Signal(syscall.SIGKILL)
	<-e.agentDone
}

// daemon starts a SPIRE process with its output in a log file and stops it when the test ends;
// the log is printed if the test failed. The channel is closed when the process has exited.
func (e *spireEnv) daemon(name, bin string, args ...string) (*exec.Cmd, <-chan struct{}) {
	e.t.Helper()
	logPath := filepath.Join(e.dir, name+".log")
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		e.t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = e.dir
	cmd.Stdout, cmd.Stderr = logFile, logFile
	// Its own process group, so that nothing it forks outlives the test; killed with the test
	// process too, should that die without cleaning up.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		e.t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	e.t.Cleanup(func() {
		select {
		case <-done:
			// Already gone (killAgent): its pid may belong to another process by now.
		default:
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-done
		}
		logFile.Close()
		if e.t.Failed() {
			if b, err := os.ReadFile(logPath); err == nil {
				e.t.Logf("%s log (last lines):\n%s", name, lastLines(string(b), 40))
			}
		}
	})
	return cmd, done
}

func (e *spireEnv) serverCmd(args ...string) string {
	e.t.Helper()
	full := append([]string{args[0], args[1], "-socketPath", e.serverSock}, args[2:]...)
	out, err := exec.Command(e.server, full...).CombinedOutput()
	if err != nil {
		e.t.Fatalf("spire-server %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// bundleAuthorities returns the X.509 authorities the server distributes.
func (e *spireEnv) bundleAuthorities() []*x509.Certificate {
	e.t.Helper()
	rest := []byte(e.serverCmd("bundle", "show"))
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			e.t.Fatal(err)
		}
		certs = append(certs, c)
	}
	return certs
}

func (e *spireEnv) waitFor(what string, cond func() bool) {
	e.t.Helper()
	waitUntil(e.t, 60*time.Second, what, cond)
}

// waitUntil polls cond until it holds or the limit passes. Limits are generous bounds, not
// timing assertions.
func waitUntil(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, limit)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// setClock moves the source's clock, as if that much time had passed.
func (s *Source) setClock(offset time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.now = func() time.Time { return time.Now().Add(offset) }
}
