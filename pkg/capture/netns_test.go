package capture

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"strings"
	"testing"
)

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
}

// netnsPrefix starts the names of the namespaces the tests create; MESHLESS_TEST_NETNS_PREFIX
// replaces it, so that concurrent runs on one machine can tell their namespaces apart.
func netnsPrefix() string {
	if p := os.Getenv("MESHLESS_TEST_NETNS_PREFIX"); p != "" {
		return p
	}
	return "mlcap-"
}

// newNetns creates a network namespace named <prefix><random> (lo down, as the kernel makes it), removed when the test ends.
func newNetns(t testing.TB) (name, path string) {
	t.Helper()
	suffix := make([]byte, 5)
	if _, err := rand.Read(suffix); err != nil {
		t.Fatal(err)
	}
	name = netnsPrefix() + hex.EncodeToString(suffix)
	run(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	return name, "/var/run/netns/" + name
}

// run runs a command and fails the test if it fails; it returns the standard output.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, stderr)
	}
	return string(out)
}

// inNetns runs a command inside the named netns.
func inNetns(t *testing.T, netns string, args ...string) string {
	t.Helper()
	return run(t, "ip", append([]string{"netns", "exec", netns}, args...)...)
}

// runWithStdin runs a command inside the named netns with input on its standard input.
func runWithStdin(netns, input string, args ...string) ([]byte, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", netns}, args...)...)
	cmd.Stdin = strings.NewReader(input)
	return cmd.CombinedOutput()
}
