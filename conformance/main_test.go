package conformance_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

// binDir holds the binaries built for this test binary; TestMain removes it.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "meshless-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

var (
	harnessOnce sync.Once
	harnessBins *conformance.Bins
	harnessErr  error
	fullOnce    sync.Once
	fullBins    *conformance.Bins
	fullErr     error
)

func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, iptables, tcpdump)")
	}
}

// harnessBinaries builds the binaries the harness needs without meshless, once per test binary.
func harnessBinaries(t *testing.T) *conformance.Bins {
	t.Helper()
	harnessOnce.Do(func() {
		ctx, cancel := buildCtx()
		defer cancel()
		harnessBins, harnessErr = conformance.BuildHarnessBinaries(ctx, filepath.Join(binDir, "harness"))
	})
	if harnessErr != nil {
		t.Fatal(harnessErr)
	}
	return harnessBins
}

// binaries builds meshless and everything around it, once per test binary. A build failure
// fails the test: a broken meshless must never look like a skipped suite.
func binaries(t testing.TB) *conformance.Bins {
	t.Helper()
	fullOnce.Do(func() {
		ctx, cancel := buildCtx()
		defer cancel()
		fullBins, fullErr = conformance.BuildBinaries(ctx, filepath.Join(binDir, "full"))
	})
	if fullErr != nil {
		t.Fatal(fullErr)
	}
	return fullBins
}

// buildCtx bounds a build, so that a hung toolchain fails the suite instead of stalling it.
func buildCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 5*time.Minute)
}

// testCtx returns a context that ends with the test (or after a generous bound).
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	return ctx
}
