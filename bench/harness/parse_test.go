package harness

// The tools' outputs in testdata/ were recorded from the Debian packages' iperf3 3.12 and wrk
// 4.1.0 and from hey v0.1.5, run against servers on loopback.

import (
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshless/meshless/conformance"
)

func readTestdata(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseIPerf(t *testing.T) {
	res, err := ParseIPerf(readTestdata(t, "iperf3.json"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Bytes != 464125952 || res.BitsPerSecond != 3665824785.1898217 {
		t.Errorf("iperf3: %+v", res)
	}
	if _, err := ParseIPerf(readTestdata(t, "iperf3-refused.json")); err == nil || !strings.Contains(err.Error(), "Connection refused") {
		t.Errorf("iperf3 refused: %v", err)
	}
	if _, err := ParseIPerf([]byte("iperf3: error")); err == nil {
		t.Error("iperf3 output that is not JSON was accepted")
	}
}

func TestParseWrk(t *testing.T) {
	res, err := ParseWrk(readTestdata(t, "wrk.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if res.Requests != 566 || res.RequestsPerSecond != 508.99 {
		t.Errorf("wrk: %+v", res)
	}
	if _, err := ParseWrk(readTestdata(t, "wrk-non2xx.txt")); err == nil || !strings.Contains(err.Error(), "584 responses were not 2xx") {
		t.Errorf("wrk with error answers: %v", err)
	}
	withErrors := strings.Replace(string(readTestdata(t, "wrk.txt")), "Requests/sec:", "  Socket errors: connect 0, read 2, write 0, timeout 0\nRequests/sec:", 1)
	if _, err := ParseWrk([]byte(withErrors)); err == nil || !strings.Contains(err.Error(), "read 2") {
		t.Errorf("wrk with socket errors: %v", err)
	}
	noErrors := strings.Replace(string(readTestdata(t, "wrk.txt")), "Requests/sec:", "  Socket errors: connect 0, read 0, write 0, timeout 0\nRequests/sec:", 1)
	if _, err := ParseWrk([]byte(noErrors)); err != nil {
		t.Errorf("wrk with zero socket errors: %v", err)
	}
}

func TestParseHey(t *testing.T) {
	res, err := ParseHey(readTestdata(t, "hey.txt"))
	if err != nil {
		t.Fatal(err)
	}
	if res.OK != 738 || res.Errors != 0 || res.Total != 1005100*time.Microsecond {
		t.Errorf("hey: %+v", res)
	}
	if want := 738 / 1.0051; math.Abs(res.RequestsPerSecond-want) > 1e-9 {
		t.Errorf("hey rate %v, want %v", res.RequestsPerSecond, want)
	}
	// Connections refused: hey's own Requests/sec counts them, the parser does not.
	if res, err := ParseHey(readTestdata(t, "hey-refused.txt")); err == nil || res.Errors != 3826 {
		t.Errorf("hey refused: %+v, %v", res, err)
	}
	// Some requests cut off at the end of a run are counted, not fatal.
	cut := string(readTestdata(t, "hey.txt")) + "Error distribution:\n  [2]\tGet \"http://x/1k\": context canceled\n"
	if res, err := ParseHey([]byte(cut)); err != nil || res.OK != 738 || res.Errors != 2 {
		t.Errorf("hey with a few errors: %+v, %v", res, err)
	}
	notFound := strings.Replace(string(readTestdata(t, "hey.txt")), "[200]\t738 responses", "[200]\t700 responses\n  [404]\t38 responses", 1)
	if _, err := ParseHey([]byte(notFound)); err == nil || !strings.Contains(err.Error(), "status 404") {
		t.Errorf("hey with 404s: %v", err)
	}
}

func TestParseStatTicks(t *testing.T) {
	// A command name with spaces and a parenthesis; utime 1234, stime 56.
	stat := "4242 (we(ird) name) S 1 4242 4242 0 -1 4194560 1000 0 0 0 1234 56 0 0 20 0 3 0 100 1000000 500 18446744073709551615\n"
	got, err := parseStatTicks(stat)
	if err != nil || got != 1290 {
		t.Errorf("parseStatTicks = %d, %v; want 1290", got, err)
	}
	if _, err := parseStatTicks("4242 (x) S 1 2"); err == nil {
		t.Error("a short stat line was accepted")
	}
	self, err := CPUSeconds([]int{os.Getpid()})
	if err != nil || self < 0 {
		t.Errorf("CPUSeconds(self) = %v, %v", self, err)
	}
	if rss, err := conformance.StatusKiB(os.Getpid(), "VmRSS"); err != nil || rss <= 0 {
		t.Errorf("VmRSS of self = %v, %v", rss, err)
	}
}
