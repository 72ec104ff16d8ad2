package capture

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// BackendFile is the file, in the directory given to LoadOrDetectBackend, that records the
// node's iptables backend.
const BackendFile = "iptables-backend"

// DetectBackend decides, in the current (host) netns, which iptables backend the node uses: the
// one whose tables hold more rules (kube-proxy's, the primary CNI's), nft when both hold none or
// as many, and the only one installed when the other is missing. It counts the rules that
// iptables-<backend>-save and ip6tables-<backend>-save show.
func DetectBackend() (Backend, error) {
	legacy, legacyErr := countBackendRules(Legacy)
	nft, nftErr := countBackendRules(NFT)
	b, err := decideBackend(legacy, nft)
	if err != nil {
		return "", fmt.Errorf("%w: %w", err, errors.Join(legacyErr, nftErr))
	}
	return b, nil
}

// errNoBackend means neither backend's programs are usable.
var errNoBackend = errors.New("no usable iptables backend: neither iptables-legacy nor iptables-nft works (install the iptables package)")

// decideBackend is the decision of DetectBackend given the rule count of each backend, negative
// when the backend's programs are missing or fail.
func decideBackend(legacy, nft int) (Backend, error) {
	switch {
	case legacy < 0 && nft < 0:
		return "", errNoBackend
	case nft < 0:
		return Legacy, nil
	case legacy < 0:
		return NFT, nil
	case legacy > nft:
		return Legacy, nil
	default:
		// nft is what current distributions default to, so it wins when nothing tells them apart.
		return NFT, nil
	}
}

// countBackendRules counts the rules the backend holds in the current netns, for both families;
// -1 with the reason when its programs are missing or its IPv4 save fails. The IPv6 save may fail
// (IPv6 disabled) without making the backend unusable.
func countBackendRules(b Backend) (int, error) {
	for _, suffix := range []string{"", "-restore"} {
		if _, err := lookTool(toolName(b, 4, suffix)); err != nil {
			return -1, err
		}
	}
	total := 0
	for _, family := range []int{4, 6} {
		save, err := lookTool(toolName(b, family, "-save"))
		if err != nil {
			if family == 4 {
				return -1, err
			}
			continue
		}
		var stderr bytes.Buffer
		cmd := exec.Command(save)
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			if family == 4 {
				return -1, fmt.Errorf("%s: %w: %s", save, err, strings.TrimSpace(stderr.String()))
			}
			continue
		}
		total += countSavedRules(out)
	}
	return total, nil
}

// countSavedRules counts the rules in iptables-save output, leaving out ours: they say nothing
// about what the node's own components use.
func countSavedRules(save []byte) int {
	n := 0
	sc := bufio.NewScanner(bytes.NewReader(save))
	sc.Buffer(make([]byte, 0, 64*1024), 1024*1024)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || f[0] != "-A" || isOurs(f[1]) {
			continue
		}
		jumpsToOurs := false
		for i := 2; i+1 < len(f); i++ {
			if (f[i] == "-j" || f[i] == "-g") && isOurs(f[i+1]) {
				jumpsToOurs = true
			}
		}
		if !jumpsToOurs {
			n++
		}
	}
	return n
}

func isOurs(chain string) bool { return strings.HasPrefix(chain, "MESHLESS_") }

// LoadOrDetectBackend returns the backend recorded in dir/BackendFile, or detects it and records
// it there. The decision is made once per node and kept, because probing can load kernel modules
// and so change what a later probe would see. When several callers race, the first record wins
// and every caller returns it.
func LoadOrDetectBackend(dir string) (Backend, error) {
	path := filepath.Join(dir, BackendFile)
	b, err := readBackend(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return b, err
	}
	b, err = DetectBackend()
	if err != nil {
		return "", err
	}
	if err := recordBackend(dir, path, b); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return readBackend(path)
		}
		return "", err
	}
	return b, nil
}

func readBackend(path string) (Backend, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("read iptables backend record: %w", err)
	}
	b := Backend(strings.TrimSpace(string(data)))
	if b != Legacy && b != NFT {
		return "", fmt.Errorf("iptables backend record %s holds %q, want %q or %q (delete it to detect again)",
			path, b, Legacy, NFT)
	}
	return b, nil
}

// recordBackend writes the record completely under a temporary name and links it into place,
// which fails with fs.ErrExist if another caller recorded a decision first.
func recordBackend(dir, path string, b Backend) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("record iptables backend: %w", err)
	}
	tmp, err := os.CreateTemp(dir, "."+BackendFile+"-*")
	if err != nil {
		return fmt.Errorf("record iptables backend: %w", err)
	}
	defer os.Remove(tmp.Name())
	_, err = tmp.WriteString(string(b) + "\n")
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o644)
	}
	if err == nil {
		err = os.Link(tmp.Name(), path)
	}
	if err != nil {
		return fmt.Errorf("record iptables backend in %s: %w", path, err)
	}
	return nil
}
