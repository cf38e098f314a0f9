// SPDX-License-Identifier: GPL-3.0-only
//! The machine-level start: the PVH entry note, the 32-bit entry point QEMU jumps to, the
//! switch to long mode, and the interrupt stubs. Rust takes over at `rust_start`.
//!
//! PVH (Xen's direct boot protocol, which QEMU's `-kernel` implements for an ELF carrying the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note) enters in 32-bit protected mode, flat segments, paging
//! off, interrupts off, with `%ebx` holding the physical address of `hvm_start_info`. The
//! entry code here:
//! 1. reads the TSC first, so the kernel can say how long it took from its first instruction;
//! 2. identity-maps the first 4 GiB with 2 MiB pages (RAM, and the MMIO window at
//!    0xfeb00000.. where microvm's virtio-mmio, IOAPIC and local APIC live, uncached);
//! 3. enables PAE, SSE (the host target's code uses SSE2 freely) and long mode, loads a
//!    64-bit GDT and jumps to 64-bit code on a 256 KiB stack;
//! 4. calls `rust_start(start_info)`, which never returns.
//!
//! It owns no policy: the IDT is filled and loaded from Rust (`sys::cpu`), which also decides
//! when interrupts may arrive (only inside `idle_wait`).

use core::arch::global_asm;

/// Stack size of the one and only thread.
pub(crate) const STACK_SIZE: usize = 256 * 1024;

global_asm!(
    r#"
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4            /* name size: "Xen\0" */
    .long 4            /* descriptor size */
    .long 18           /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start
    .balign 4
    .popsection

    .pushsection .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:  .skip 4096
boot_pdpt:  .skip 4096
boot_pd:    .skip 4 * 4096
    .balign 16
boot_stack: .skip {stack_size}
boot_stack_top:
    .balign 8
    .global entry_tsc
entry_tsc:  .skip 8
    .popsection

    .pushsection .rodata.boot, "a"
    .balign 8
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff   /* 0x08: 64-bit code, ring 0 */
    .quad 0x00cf92000000ffff   /* 0x10: data, ring 0 */
boot_gdt_end:
    .balign 4
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    .popsection

    .pushsection .text.boot, "ax"
    .code32
    .global pvh_start
pvh_start:
    cli
    cld
    mov %ebx, %esi
    rdtsc
    mov %eax, entry_tsc
    mov %edx, entry_tsc + 4

    /* Zero the six page-table pages (fresh RAM is zero, a reset VM's may not be). */
    mov $boot_pml4, %edi
    xor %eax, %eax
    mov $(6 * 1024), %ecx
    rep stosl

    mov $boot_pdpt + 3, %eax
    mov %eax, boot_pml4
    mov $boot_pd + 3, %eax
    mov %eax, boot_pdpt
    add $4096, %eax
    mov %eax, boot_pdpt + 8
    add $4096, %eax
    mov %eax, boot_pdpt + 16
    add $4096, %eax
    mov %eax, boot_pdpt + 24

    /* 2048 2 MiB pages: present, writable, large. */
    mov $boot_pd, %edi
    mov $0x83, %eax
    mov $2048, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    /* 0xfe000000..4 GiB (virtio-mmio, IOAPIC, local APIC): cache disabled, write-through. */
    mov $boot_pd + (3 * 512 + 496) * 8, %edi
    mov $16, %ecx
2:  orl $0x18, (%edi)
    add $8, %edi
    loop 2b

    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov %cr4, %eax
    or $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $0xc0000080, %ecx      /* EFER */
    rdmsr
    or $0x100, %eax            /* LME */
    wrmsr
    mov %cr0, %eax
    and $~0xc, %eax            /* no EM, no TS: SSE instructions run */
    or $0x80000023, %eax       /* PG | NE | MP | PE */
    mov %eax, %cr0
    lgdt boot_gdt_ptr
    ljmp $0x08, $long_entry

    .code64
long_entry:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $boot_stack_top, %rsp
    fninit
    mov %esi, %edi
    call rust_start
3:  cli
    hlt
    jmp 3b

    /* Exceptions 0..31, one 16-byte stub each (the IDT points at exception_stubs + 16 * n):
       push a zero where the CPU pushes no error code, then the vector. */
    .balign 16
    .global exception_stubs
exception_stubs:
    .set vector, 0
    .rept 32
    .balign 16
    .if (vector == 8) || ((vector >= 10) && (vector <= 14)) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    push $0
    .endif
    push $vector
    jmp exception_common
    .set vector, vector + 1
    .endr

exception_common:
    mov (%rsp), %rdi           /* vector */
    mov 8(%rsp), %rsi          /* error code */
    mov 16(%rsp), %rdx         /* rip */
    mov %cr2, %rcx
    and $-16, %rsp
    call exception_handler
4:  cli
    hlt
    jmp 4b

    /* Every device or timer interrupt: acknowledge it at the local APIC and return. The
       work is done by the main loop, which the interrupt woke from `hlt`. */
    .balign 16
    .global irq_stub
irq_stub:
    push %rax
    movabs $0xfee000b0, %rax
    movl $0, (%rax)
    pop %rax
    iretq

    .balign 16
    .global spurious_stub
spurious_stub:
    iretq

    /* Waits for the next interrupt: interrupts are enabled only here, for one `hlt` (`sti`
       holds them off for one instruction, so none is lost between the two). Called, so no
       caller has live data in a red zone below the stack pointer. */
    .balign 16
    .global idle_wait
idle_wait:
    sti
    hlt
    cli
    ret

    .popsection
    "#,
    stack_size = const STACK_SIZE,
    options(att_syntax)
);
