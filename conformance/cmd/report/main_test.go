package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// A run as `go test -json` prints it: a passing test with a figure in a subtest, a skipped
// test, a failing one, and a line that is not an event.
const sampleRun = `{"Time":"2026-01-02T10:00:00Z","Action":"start","Package":"example/conformance"}
{"Time":"2026-01-02T10:00:00Z","Action":"run","Package":"example/conformance","Test":"TestA"}
{"Time":"2026-01-02T10:00:00Z","Action":"output","Package":"example/conformance","Test":"TestA","Output":"=== RUN   TestA\n"}
{"Time":"2026-01-02T10:00:00Z","Action":"run","Package":"example/conformance","Test":"TestA/sub"}
{"Time":"2026-01-02T10:00:01Z","Action":"output","Package":"example/conformance","Test":"TestA/sub","Output":"    figure.go:10: FIGURE a_throughput=67.25 MiB/s each way\n"}
{"Time":"2026-01-02T10:00:01Z","Action":"output","Package":"example/conformance","Test":"TestA/sub","Output":"    a_test.go:3: not a FIGURE line\n"}
{"Time":"2026-01-02T10:00:02Z","Action":"pass","Package":"example/conformance","Test":"TestA/sub","Elapsed":2}
{"Time":"2026-01-02T10:00:02Z","Action":"pass","Package":"example/conformance","Test":"TestA","Elapsed":2.5}
{"Time":"2026-01-02T10:00:02Z","Action":"run","Package":"example/conformance","Test":"TestSkipped"}
{"Time":"2026-01-02T10:00:02Z","Action":"skip","Package":"example/conformance","Test":"TestSkipped","Elapsed":0}
not json at all
{"Time":"2026-01-02T10:00:02Z","Action":"run","Package":"example/conformance","Test":"TestB"}
{"Time":"2026-01-02T10:00:03Z","Action":"output","Package":"example/conformance","Test":"TestB","Output":"    b_test.go:9: broken\n"}
{"Time":"2026-01-02T10:00:03Z","Action":"fail","Package":"example/conformance","Test":"TestB","Elapsed":1}
{"Time":"2026-01-02T10:00:04Z","Action":"fail","Package":"example/conformance","Elapsed":4}
`

func TestCollect(t *testing.T) {
	var echo bytes.Buffer
	rep, err := collect(strings.NewReader(sampleRun), &echo)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Result != resultFail || rep.Passed != 2 || rep.Failed != 1 || rep.Skipped != 1 || rep.DurationSeconds != 4 {
		t.Errorf("report %+v: want fail with 2 passed, 1 failed, 1 skipped in 4s", rep)
	}
	if len(rep.Tests) != 4 || rep.Tests[1].Name != "TestA/sub" || rep.Tests[1].DurationSeconds != 2 {
		t.Fatalf("tests %+v", rep.Tests)
	}
	want := Figure{Name: "a_throughput", Value: 67.25, Unit: "MiB/s each way"}
	if figs := rep.Tests[1].Figures; len(figs) != 1 || figs[0] != want {
		t.Errorf("figures of TestA/sub: %+v, want [%+v]", figs, want)
	}
	for _, s := range []string{"=== RUN   TestA\n", "FIGURE a_throughput", "not json at all\n", "b_test.go:9: broken\n"} {
		if !strings.Contains(echo.String(), s) {
			t.Errorf("echoed output lacks %q:\n%s", s, echo.String())
		}
	}

	dir := t.TempDir()
	if err := write(rep, dir); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(dir, "report.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"**FAIL**: 2 passed, 1 failed, 1 skipped", "| `TestB` | **FAIL** | 1s |", "| a_throughput | 67.25 | MiB/s each way | `TestA/sub` |"} {
		if !strings.Contains(string(md), s) {
			t.Errorf("report.md lacks %q:\n%s", s, md)
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, "report.json"))
	if err != nil {
		t.Fatal(err)
	}
	var back Report
	if err := json.Unmarshal(b, &back); err != nil || back.Failed != 1 || len(back.Tests) != 4 {
		t.Errorf("report.json does not read back: %v %+v", err, back)
	}
}

func TestCollectUnfinished(t *testing.T) {
	// The test binary died (a panic, a timeout) while TestA ran: the package fails, TestA has
	// no result of its own.
	run := `{"Time":"2026-01-02T10:00:00Z","Action":"run","Package":"p","Test":"TestA"}
{"Time":"2026-01-02T10:00:01Z","Action":"output","Package":"p","Test":"TestA","Output":"panic: boom\n"}
{"Time":"2026-01-02T10:00:01Z","Action":"fail","Package":"p","Elapsed":1}
`
	rep, err := collect(strings.NewReader(run), &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if rep.Result != resultFail || rep.Tests[0].Result != resultUnfinished || rep.Failed != 1 {
		t.Errorf("report %+v, test %+v: want a failure with TestA unfinished", rep, rep.Tests[0])
	}
}

func TestCollectNothing(t *testing.T) {
	// go test failed before running anything: only its own error lines, which are echoed.
	var echo bytes.Buffer
	if _, err := collect(strings.NewReader("go: cannot find main module\n"), &echo); err == nil {
		t.Error("input without a package result was accepted")
	}
	if echo.String() != "go: cannot find main module\n" {
		t.Errorf("echoed %q", echo.String())
	}
}
