# Holds three files in directory ARGV1 whose names are gone: `a` deleted, `b` deleted and its name taken by a
# new file, `c` still linked as `c2`. Now and for each line on stdin, prints what it reads back from each and
# what the directory holds.
import os, sys
d = sys.argv[1]
a = open(d + "/a", "w+"); a.write("alpha " * 10); a.flush(); os.unlink(d + "/a")
b = open(d + "/b", "w+"); b.write("beta " * 10); b.flush(); os.unlink(d + "/b")
with open(d + "/b", "w") as new:
    new.write("the new b")
c = open(d + "/c", "w+"); c.write("gamma " * 10); c.flush(); os.link(d + "/c", d + "/c2"); os.unlink(d + "/c")
def report():
    for f in (a, b, c):
        f.seek(0)
        print(f.read(), flush=True)
    print(open(d + "/b").read(), sorted(os.listdir(d)), flush=True)
report()
while sys.stdin.readline():
    report()
