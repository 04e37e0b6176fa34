/* The nonewprivs image's program, installed set-uid root: with no_new_privs the kernel ignores
   the set-uid bit and the effective uid stays the caller's. */
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("Effective uid: %d\n", (int)geteuid());
    return 0;
}
