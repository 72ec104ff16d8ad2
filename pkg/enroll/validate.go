package enroll

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"golang.org/x/sys/unix"
)

const (
	maxContainerIDLen = 256
	maxUIDLen         = 128
	// maxIfNameLen is IFNAMSIZ minus the terminating NUL.
	maxIfNameLen = 15
	maxLabelLen  = 63
	maxDNSLen    = 253
	// maxAnnotationsSize is the Kubernetes API's bound on a pod's annotations (keys and values).
	maxAnnotationsSize = 256 << 10
)

var (
	// containerIDRe is the character set the CNI spec allows for container IDs.
	containerIDRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.\-]*$`)
	labelRe       = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
)

// Validate checks every field of p and returns an error wrapping ErrInvalid that names each
// problem, so that the daemon refuses a pod it could not serve instead of failing later.
func (p Pod) Validate() error {
	var problems []string
	add := func(err error) {
		if err != nil {
			problems = append(problems, err.Error())
		}
	}
	add(validateContainerID(p.ContainerID))
	add(validateIfName(p.IfName))
	add(validateNetns(p.Netns))
	add(validateLabel("namespace", p.Namespace))
	add(validateSubdomain("name", p.Name))
	add(validateUID(p.UID))
	add(p.validateIPs())
	add(validateAnnotations(p.Annotations))
	if len(problems) > 0 {
		return fmt.Errorf("%w: pod %q: %s", ErrInvalid, p.ContainerID, strings.Join(problems, "; "))
	}
	return nil
}

// ValidateContainerID checks a container ID as the CNI spec defines it, with a length bound;
// the error wraps ErrInvalid.
func ValidateContainerID(id string) error {
	if err := validateContainerID(id); err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	return nil
}

// ValidateNamespace checks a Kubernetes namespace name (a DNS-1123 label).
func ValidateNamespace(ns string) error {
	return validateLabel("namespace", ns)
}

func validateContainerID(id string) error {
	switch {
	case id == "":
		return errors.New("containerID is empty")
	case len(id) > maxContainerIDLen:
		return fmt.Errorf("containerID is %d characters long (at most %d)", len(id), maxContainerIDLen)
	case !containerIDRe.MatchString(id):
		return fmt.Errorf("containerID %q must start with a letter or digit and contain only letters, digits, '_', '.' and '-'", id)
	}
	return nil
}

func validateIfName(name string) error {
	switch {
	case name == "":
		return errors.New("ifName is empty")
	case len(name) > maxIfNameLen:
		return fmt.Errorf("ifName %q is longer than %d bytes", name, maxIfNameLen)
	case name == "." || name == "..":
		return fmt.Errorf("ifName %q is not an interface name", name)
	case strings.ContainsAny(name, "/: \t\n\r\x00"):
		return fmt.Errorf("ifName %q contains '/', ':' or whitespace", name)
	}
	return nil
}

func validateNetns(path string) error {
	if path == "" {
		return errors.New("netns is empty")
	}
	if !filepath.IsAbs(path) || filepath.Clean(path) != path {
		return fmt.Errorf("netns %q must be a clean absolute path", path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("netns %q does not exist (was the pod deleted?)", path)
		}
		return fmt.Errorf("netns %q: %w", path, err)
	}
	if fi.IsDir() {
		return fmt.Errorf("netns %q is a directory, not a network namespace", path)
	}
	// A bind-mounted namespace is on nsfs; /proc/PID/ns/net is on procfs with older kernels.
	var fs unix.Statfs_t
	if err := unix.Statfs(path, &fs); err != nil {
		return fmt.Errorf("netns %q: statfs: %w", path, err)
	}
	if fs.Type != unix.NSFS_MAGIC && fs.Type != unix.PROC_SUPER_MAGIC {
		return fmt.Errorf("netns %q is not a network namespace (not on nsfs)", path)
	}
	return nil
}

func validateLabel(field, s string) error {
	switch {
	case s == "":
		return fmt.Errorf("%s is empty", field)
	case len(s) > maxLabelLen:
		return fmt.Errorf("%s %q is longer than %d characters", field, s, maxLabelLen)
	case !labelRe.MatchString(s):
		return fmt.Errorf("%s %q is not a DNS-1123 label (lower-case letters, digits and '-', starting and ending with a letter or digit)", field, s)
	}
	return nil
}

func validateSubdomain(field, s string) error {
	switch {
	case s == "":
		return fmt.Errorf("%s is empty", field)
	case len(s) > maxDNSLen:
		return fmt.Errorf("%s %q is longer than %d characters", field, s, maxDNSLen)
	}
	for _, label := range strings.Split(s, ".") {
		if len(label) > maxLabelLen || !labelRe.MatchString(label) {
			return fmt.Errorf("%s %q is not a DNS-1123 subdomain (dot-separated lower-case labels of letters, digits and '-')", field, s)
		}
	}
	return nil
}

func validateUID(uid string) error {
	if uid == "" {
		return nil // pods created outside Kubernetes have no UID
	}
	if len(uid) > maxUIDLen || !containerIDRe.MatchString(uid) {
		return fmt.Errorf("uid %q must be at most %d letters, digits, '_', '.' or '-'", uid, maxUIDLen)
	}
	return nil
}

func (p Pod) validateIPs() error {
	if len(p.IPs) == 0 {
		return errors.New("ips is empty (the pod needs at least one address)")
	}
	seen := make(map[netip.Addr]bool, len(p.IPs))
	for _, ip := range p.IPs {
		switch {
		case !ip.IsValid():
			return errors.New("ips holds an empty address")
		case ip.Is4In6():
			return fmt.Errorf("ip %s is IPv4-mapped IPv6; send %s", ip, ip.Unmap())
		case ip.Zone() != "":
			return fmt.Errorf("ip %s has a zone", ip)
		case ip.IsUnspecified(), ip.IsLoopback(), ip.IsMulticast():
			return fmt.Errorf("ip %s cannot be a pod address (unspecified, loopback or multicast)", ip)
		case seen[ip]:
			return fmt.Errorf("ip %s is listed twice", ip)
		}
		seen[ip] = true
	}
	return nil
}

func validateAnnotations(a map[string]string) error {
	size := 0
	for k, v := range a {
		if k == "" {
			return errors.New("annotations hold an empty key")
		}
		size += len(k) + len(v)
	}
	if size > maxAnnotationsSize {
		return fmt.Errorf("annotations are %d bytes (at most %d, as in Kubernetes)", size, maxAnnotationsSize)
	}
	return nil
}
