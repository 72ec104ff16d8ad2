package conformance

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// Packages built by BuildBinaries, by binary name.
const (
	PluginPkg    = "./plugin"
	DaemonPkg    = "./daemon"
	TestAppPkg   = "./conformance/cmd/meshless-testapp"
	BridgePkg    = "github.com/containernetworking/plugins/plugins/main/bridge"
	HostLocalPkg = "github.com/containernetworking/plugins/plugins/ipam/host-local"
	LoopbackPkg  = "github.com/containernetworking/plugins/plugins/main/loopback"
)

// Bins locates the binaries the harness runs. Dir is also the CNI plugin search path.
type Bins struct {
	Dir     string
	Plugin  string // meshless-cni; empty when built without meshless
	Daemon  string // meshlessd; empty when built without meshless
	TestApp string // meshless-testapp
}

// Meshless reports whether meshless-cni and meshlessd were built.
func (b *Bins) Meshless() bool { return b.Plugin != "" && b.Daemon != "" }

// BuildBinaries builds meshless-cni, meshlessd, meshless-testapp and the reference CNI plugins
// (bridge, host-local, loopback) into dir, which it creates if needed. It must run inside the
// meshless module (a test's working directory is).
func BuildBinaries(ctx context.Context, dir string) (*Bins, error) {
	return build(ctx, dir, true)
}

// BuildHarnessBinaries builds only what the harness needs without meshless: meshless-testapp and
// the reference CNI plugins. Tests of the harness itself use it, so that they do not depend on the
// code under test.
func BuildHarnessBinaries(ctx context.Context, dir string) (*Bins, error) {
	return build(ctx, dir, false)
}

func build(ctx context.Context, dir string, meshless bool) (*Bins, error) {
	root, err := ModuleRoot(ctx)
	if err != nil {
		return nil, err
	}
	dir, err = filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("creating bin dir: %w", err)
	}
	b := &Bins{Dir: dir, TestApp: filepath.Join(dir, "meshless-testapp")}
	pkgs := []string{TestAppPkg, BridgePkg, HostLocalPkg, LoopbackPkg}
	if meshless {
		// The binaries are named after their contract (ARCHITECTURE.md), not their directories.
		for _, bin := range []struct{ pkg, name string }{{PluginPkg, "meshless-cni"}, {DaemonPkg, "meshlessd"}} {
			out := filepath.Join(dir, bin.name)
			if err := goBuild(ctx, root, out, bin.pkg); err != nil {
				return nil, err
			}
		}
		b.Plugin, b.Daemon = filepath.Join(dir, "meshless-cni"), filepath.Join(dir, "meshlessd")
	}
	// `go build -o DIR/` with several main packages writes one binary per package, named after
	// its last path element; that is how these are named on a real node too.
	if err := goBuild(ctx, root, dir+string(filepath.Separator), pkgs...); err != nil {
		return nil, err
	}
	return b, nil
}

func goBuild(ctx context.Context, root, out string, pkgs ...string) error {
	goBin, err := goTool()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, goBin, append([]string{"build", "-o", out}, pkgs...)...)
	cmd.Dir = root
	// The plugins must run on any node: no cgo, so no libc version to match.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go build %s: %w\n%s", strings.Join(pkgs, " "), err, stderr.String())
	}
	return nil
}

// ModuleRoot returns the directory of the meshless module that contains the working directory.
func ModuleRoot(ctx context.Context) (string, error) {
	goBin, err := goTool()
	if err != nil {
		return "", err
	}
	out, err := exec.CommandContext(ctx, goBin, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside a Go module: run from the meshless repository")
	}
	return filepath.Dir(gomod), nil
}

// goTool finds the go command; sudo and `ip netns exec` environments may lack /usr/local/go/bin.
func goTool() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	candidates := []string{"/usr/local/go/bin/go"}
	if root := os.Getenv("GOROOT"); root != "" {
		candidates = append([]string{filepath.Join(root, "bin", "go")}, candidates...)
	}
	for _, p := range candidates {
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", errors.New("go command not found in PATH or /usr/local/go/bin")
}
