package enroll

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// backendHintPath is where meshlessd publishes the node's iptables backend: beside its socket,
// so that every socket (a node in the test harness has its own) has its own.
func backendHintPath(socketPath string) string { return socketPath + ".backend" }

// PublishBackend writes the node's iptables backend beside the socket at socketPath. The plugin
// reads it to install a pod's rules while the daemon enrolls the pod, instead of after; the
// Enrollment's Backend still decides. The file is replaced whole, so a reader never sees half.
func PublishBackend(socketPath, backend string) error {
	path := backendHintPath(socketPath)
	tmp, err := os.CreateTemp(filepath.Dir(path), ".backend-*")
	if err != nil {
		return fmt.Errorf("publish iptables backend: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.WriteString(backend + "\n")
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("publish iptables backend in %s: %w", path, err)
	}
	return nil
}

// BackendHint returns the backend published beside the socket at socketPath, "" when there is
// none (a daemon that does not publish it, or none running yet).
func BackendHint(socketPath string) string {
	data, err := os.ReadFile(backendHintPath(socketPath))
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(data))
}
