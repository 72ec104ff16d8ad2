package enroll
import ("testing";"context")
func TestMsg(t *testing.T){ _, err := NewClient("/var/run/meshless/cni.sock").Status(context.Background()); t.Log(err)
 p:=validPod(); p.Netns="/x"; p.Name="A"; t.Log(p.Validate()) }
