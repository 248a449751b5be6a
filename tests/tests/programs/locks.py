# Takes an flock on `flock` and a POSIX (fcntl) lock on `lockf` in directory ARGV1, and, now and for each line
# on stdin, has another process of the job try both without waiting.
import fcntl, os, sys
d = sys.argv[1]
held = open(d + "/flock", "w"); fcntl.flock(held, fcntl.LOCK_EX)
posix = open(d + "/lockf", "w"); fcntl.lockf(posix, fcntl.LOCK_EX)
def report():
    child = os.fork()
    if child == 0:
        code = 0
        try:
            fcntl.flock(open(d + "/flock", "w"), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            code |= 1
        try:
            fcntl.lockf(open(d + "/lockf", "w"), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            code |= 2
        os._exit(code)
    code = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
    print("flock", "held" if code & 1 else "free", "lockf", "held" if code & 2 else "free", flush=True)
report()
while sys.stdin.readline():
    report()
