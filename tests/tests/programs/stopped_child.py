# Stops a child of its own (SIGSTOP) and prints its state as the job's /proc shows it, again for each line on
# stdin; at the end of its input it continues the child, which exits 7 once told to.
import os, signal, sys
r, w = os.pipe()
child = os.fork()
if child == 0:
    os.close(w)
    os._exit(7 if os.read(r, 3) == b"bye" else 1)
os.close(r)
os.kill(child, signal.SIGSTOP)
os.waitpid(child, os.WUNTRACED)
def state():
    return open(f"/proc/{child}/stat").read().rsplit(")", 1)[1].split()[0]
print("child", state(), flush=True)
while sys.stdin.readline():
    print("child", state(), flush=True)
os.kill(child, signal.SIGCONT)
os.write(w, b"bye")
print("child exited", os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
